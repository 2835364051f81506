"""The HTML views are self-contained and carry every token's values."""

import re

import pytest

from sae_repro import views
from sae_repro.latents import Card


def _no_network(html: str) -> None:
    assert not re.search(r'(?:src|href)="(?:https?:)?//', html)
    assert "http://" not in html and "https://" not in html


def test_token_view_shades_by_the_first_quantity_and_carries_all_values():
    texts = [["The", " cat", "\n"], ["a", " dog"]]
    q = {"||error||": [[1.0, 2.0, 0.0], [4.0, float("nan")]], "L0": [[3, 4, 5], [6, 7]]}
    out = views.token_view(texts, q, view_id="tv-1", title="demo")
    _no_network(out)
    spans = re.findall(r'<span class="sae-tok" data-v="([^"]+)" style="background:rgba\(214,69,30,([0-9.]+)\)">'
                       r'([^<]*)</span>', out)
    assert [s[2] for s in spans] == ["The", " cat", "\u21b5", "a", " dog"]
    assert [s[0] for s in spans] == ["1,3", "2,4", "0,5", "4,6", "nan,7"]
    assert [float(s[1]) for s in spans] == pytest.approx([0.85 / 4, 0.85 / 2, 0, 0.85, 0], abs=1e-3)
    assert '<option value="1">L0</option>' in out and 'getElementById("tv-1")' in out


def test_token_view_checks_shapes_and_ids():
    with pytest.raises(ValueError, match="does not have the texts' shape"):
        views.token_view([["a", "b"]], {"q": [[1.0]]}, view_id="v")
    with pytest.raises(ValueError, match="view_id"):
        views.token_view([["a"]], {"q": [[1.0]]}, view_id="bad id")


def test_cards_outline_the_activating_token_and_list_logits():
    c = Card("TopK", 7, 0.0123, 302, examples=[(["x", " <b>", "y"], [0.5, 2.0, 0.0], 1)],
             raises=[(" up", 1.5)], lowers=[(" down", -0.7)])
    out = views.cards_view([c], view_id="cards")
    _no_network(out)
    assert 'class="sae-tok sae-at" data-v="2"' in out and "&lt;b&gt;" in out
    assert "latent 7" in out and "1.23%" in out and "302 held-out firings" in out
    assert " up +1.50" in out and " down -0.70" in out
    assert "steering" not in out  # not measured: no line
    c.steering = {"scale": 2.0, "kl_per_norm": 0.0123, "target": " up", "target_logprob_delta": 0.5}
    line = "steering (added norm 2): KL 0.0123 nats per unit norm; log p( up) +0.5"
    assert line in views.cards_view([c], view_id="c2")
    both = views.side_by_side({"TopK": [c], "g-SAE": [c]}, view_id="sbs")
    assert "repeat(2," in both and both.count('class="sae-card"') == 2
    doc = views.page(out, "cards")
    assert doc.startswith("<!DOCTYPE html>") and "<title>cards</title>" in doc


def test_a_label_cannot_end_the_script_element():
    out = views.token_view([["a"]], {"</script><b>x": [[1.0]]}, view_id="v")
    assert out.count("</script>") == 1 and out.endswith("</script>")
    assert "\\u003c/script>\\u003cb>x" in out  # the label itself still reaches the menu's script
