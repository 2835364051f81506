"""The chapter object: parameters from the notebook's namespace, precision resolved once, the shared
SAE configurations (one definition, so two chapters asking for the same SAE hit one cache key),
figures and verdicts recorded with the notebook, profile and parameters."""

import json

import matplotlib.pyplot as plt  # headless: matplotlib picks the Agg backend by itself
import pandas as pd
import pytest
import torch

from sae_repro import verdicts
from sae_repro.chapter import Chapter
from sae_repro.figures import record_verdict
from sae_repro.profiles import profile
from sae_repro.zoo import sae_key


def _namespace(**changes) -> dict:
    """What a notebook's globals hold after its parameters cell (ci values), plus unrelated names."""
    values = profile("ci")
    return {"profile": "ci", "__name__": "__main__", "In": [], "plt": object(), **values, **changes}


def test_open_takes_the_profile_parameters_and_resolves_bf16():
    ch = Chapter.open("sae_zoo", _namespace(bf16=False))
    assert ch.profile == "ci" and set(ch.params) == set(profile("ci"))
    assert "plt" not in ch.params and "__name__" not in ch.params
    assert ch.bf16 is False and ch.setting.bf16 is False  # a bool, handed down as it is
    assert ch.hook == "blocks.1.hook_resid_post"
    with pytest.raises(ValueError, match="profile"):
        Chapter.open("x", {"seed": 0})
    with pytest.raises(KeyError, match="not declared"):
        Chapter("x", "ci", {"seed": 0})["main_k"]


def test_configs_follow_the_store_kind_and_are_shared():
    analysis, gradient = (Chapter.open(n, _namespace()) for n in ("dark_matter_scaling", "sae_zoo"))
    with pytest.raises(ValueError, match="stores"):
        analysis.config("topk", 8)
    analysis._opened("analysis", {})
    gradient._opened("gradient", {})
    p = profile("ci")
    a = analysis.config("topk", 8)
    assert (a.batch_size, a.epochs, a.expansion) == (p["sae_batch_size"], p["sae_epochs"], p["main_expansion"])
    g = gradient.config("topk", 8)
    assert (g.batch_size, g.epochs) == (p["zoo_batch_size"], p["zoo_epochs"])
    assert gradient.config("gradient_topk", 8).beta == p["zoo_beta"]  # the shared g-SAE
    assert gradient.config("gradient_topk", 8, beta=30.0).beta == 30.0  # a sweep says so
    assert (a.lr, a.dead_window_tokens, a.seed) == (p["sae_lr"], p["sae_dead_window_tokens"], p["seed"])
    # two chapters asking for the same SAE get the same cache entry
    other = Chapter.open("dark_matter_layers", _namespace())
    other._opened("analysis", {})
    assert sae_key("store", "h", other.config("topk", 8, 2)) == sae_key("store", "h", analysis.config("topk", 8, 2))
    assert sae_key("store", "h", other.config("topk", 8, 2)) != sae_key("store", "h", analysis.config("topk", 8, 4))
    with pytest.raises(ValueError, match="one kind"):
        analysis._opened("gradient", {})


def test_figures_and_verdicts_carry_the_chapter(tmp_path, monkeypatch):
    monkeypatch.setenv("SAE_REPRO_FIGURES", str(tmp_path))
    monkeypatch.setenv("SAE_REPRO_CACHE", str(tmp_path / "cache"))
    ch = Chapter.open("dark_matter_scaling", _namespace())
    fig = plt.figure()
    ch.figure(fig, pd.DataFrame({"x": [1]}), "t-fig", caption="c")
    entry = json.loads((tmp_path / "manifest.json").read_text())["t-fig"]
    assert (entry["notebook"], entry["profile"], entry["params"]["main_k"]) == ("dark_matter_scaling", "ci", 8)
    line = ch.verdict("t-claim", verdicts.norm_predictable([0.95]), claim="c", paper="p", ours="0.95")
    recorded = json.loads((tmp_path / "verdicts.json").read_text())["t-claim"]
    assert recorded["verdict"] == "reproduced" and recorded["why"] == verdicts.norm_predictable([0.95]).why
    assert "REPRODUCED" in line


def test_a_verdict_records_its_interval_and_trend(tmp_path, monkeypatch):
    from sae_repro import book

    monkeypatch.setenv("SAE_REPRO_FIGURES", str(tmp_path))
    monkeypatch.setenv("SAE_REPRO_CACHE", str(tmp_path / "cache"))
    ch = Chapter.open("dark_matter_scaling", _namespace())
    v = verdicts.Verdict("inconclusive", "why", interval=(0.85, 0.93), trend="toward")
    line = ch.verdict("t-claim", v, claim="c", paper="p", ours="0.89")
    ch.verdict("t-plain", verdicts.norm_predictable([0.95]), claim="c2", paper="p", ours="0.95")
    recorded = json.loads((tmp_path / "verdicts.json").read_text())
    assert recorded["t-claim"]["interval"] == [0.85, 0.93] and recorded["t-claim"]["trend"] == "toward"
    assert recorded["t-plain"]["interval"] is None and recorded["t-plain"]["trend"] is None
    assert "0.89 [95% 0.85, 0.93] (trend: toward) -> INCONCLUSIVE" in line
    assert book._ours(recorded["t-claim"]) == "0.89 (95% interval 0.85 to 0.93); with more training: toward"
    assert book._ours(recorded["t-plain"]) == "0.95"


def test_an_undefined_interval_is_recorded_as_none(tmp_path, monkeypatch):
    # a NaN bound (a statistic undefined on some resample) is no interval, and JSON has no NaN
    # (an unbounded end, such as a rate ratio's (0, inf) with no events, is an interval)
    monkeypatch.setenv("SAE_REPRO_FIGURES", str(tmp_path))
    monkeypatch.setenv("SAE_REPRO_CACHE", str(tmp_path / "cache"))
    assert verdicts.Verdict("inconclusive", "why", "n", interval=(float("nan"), 1.0)).interval is None
    assert verdicts.Verdict("inconclusive", "why", "n", interval=(0.0, float("inf"))).interval == (0.0, float("inf"))
    for claim, ci in (("t-nan", (float("nan"), float("nan"))), ("t-half", (0.0, float("nan")))):
        line = record_verdict(claim, claim="c", paper="p", ours="1", verdict="inconclusive", why="w",
                              notebook="dark_matter_scaling", profile="ci", interval=ci)
        assert "95%" not in line
    text = (tmp_path / "verdicts.json").read_text()
    assert "NaN" not in text
    recorded = json.loads(text)
    assert recorded["t-nan"]["interval"] is None and recorded["t-half"]["interval"] is None


def test_verdict_rejects_a_bad_interval_or_trend():
    with pytest.raises(ValueError, match="lo <= hi"):
        verdicts.Verdict("partly", "why", interval=(0.9, 0.8))
    with pytest.raises(ValueError, match=r"trend='up': expected one of \('toward', 'away', 'flat'\)"):
        verdicts.Verdict("partly", "why", trend="up")


def test_an_sae_of_the_chapter_follows_its_heldout_fvu(monkeypatch):
    import sae_repro.chapter as chapter_mod

    class Store:
        def __init__(self, name):
            self.name = name

        def load(self, hook, max_tokens=None):
            return (self.name, hook, max_tokens)

    seen = {}
    monkeypatch.setattr(chapter_mod, "trained_sae", lambda data, cfg, **kw: seen.update(data=data, **kw))
    ch = Chapter.open("dark_matter_scaling", _namespace())
    ch._opened("analysis", {})
    ch.stores = {"train": Store("train"), "test": Store("test")}
    ch.sae("topk", 8)
    assert seen["data"].name == "train"
    assert seen["heldout"] == ("test", ch.hook, chapter_mod.HELDOUT_TOKENS)


def test_the_verdict_table_is_html_with_text_badges_and_chapter_links(monkeypatch):
    from sae_repro import book

    recorded = {"a-claim": {"notebook": "nb_one", "claim": "x < y & z", "paper": "0.9", "ours": "0.89",
                            "interval": [0.85, 0.93], "trend": "flat", "verdict": "not reproduced",
                            "why": "criterion", "time": "2026-12-02T00:00:00+00:00"},
                "b-claim": {"notebook": "nb_one", "claim": "c", "paper": "p", "ours": "o", "verdict": "partly",
                            "why": "w", "time": "2026-12-02T00:00:01+00:00", "stale": True}}
    monkeypatch.setattr(book, "executed_profile", lambda nb: "ci" if nb == "nb_one" else None)
    monkeypatch.setattr(book, "verdicts_of", lambda prof: recorded)
    table = book.verdicts_table(["nb_one", "nb_two"])
    assert table.startswith('<table class="sae-verdicts">') and table.count("<tr id=") == 2
    assert "x &lt; y &amp; z" in table  # escaped
    assert '<span class="sae-verdict sae-verdict-not-reproduced">not reproduced</span>' in table
    b_row = table.split('id="verdict-b-claim"')[1]
    assert 'sae-verdict-stale" title="stale: its notebook&#x27;s last run failed">stale</span>' in b_row
    assert "sae-verdict-stale" not in table.split('id="verdict-b-claim"')[0]  # a-claim: no figures, current
    assert '<a href="chapters/nb_one.html">nb one</a> (ci)' in table
    assert "0.89 (95% interval 0.85 to 0.93); with more training: flat" in table
    assert table.index("a-claim") < table.index("b-claim")  # in the order the notebook found them
    assert not any(ord(ch) > 0x2000 for ch in table)  # no emoji: text badges
    assert book.verdicts_table(["nb_two"]) == "No verdicts recorded yet.\n"


def test_present_puts_prose_first_and_folds_code():
    from sae_repro import book

    def cell(kind, src, tags=()):
        c = {"cell_type": kind, "metadata": {"tags": list(tags)} if tags else {}, "source": [src]}
        return c | ({"outputs": [{"output_type": "stream", "text": ["out"]}], "execution_count": 1}
                    if kind == "code" else {})

    nb = {"cells": [cell("markdown", "# Title\nThe question."), cell("code", "k = 32", ["parameters"]),
                    cell("code", 'profile = "ci"\nk = 8', ["injected-parameters"]), cell("code", "import x"),
                    cell("markdown", "## Section")], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    found = [{"claim": "a claim", "verdict": "partly", "time": "t"}]
    shown = book.present(nb, "nb_one", "ci", found)
    kinds = [(c["cell_type"], c["metadata"].get("tags", [])) for c in shown["cells"]]
    assert kinds[0] == ("markdown", []) and "What this chapter finds" in "".join(shown["cells"][1]["source"])
    assert 'sae-verdict-partly">partly</span>' in "".join(shown["cells"][1]["source"])
    assert kinds[2] == ("code", ["parameters", "remove-cell"])  # the notebook's own values: not shown
    assert "profile `ci`" in "".join(shown["cells"][3]["source"])  # the label of the injected cell
    assert kinds[4] == ("code", ["injected-parameters"])  # shown, unfolded
    assert kinds[5] == ("code", ["hide-input"]) and shown["cells"][5]["outputs"] == nb["cells"][3]["outputs"]
    assert book.present(shown, "nb_one", "ci", found) == shown  # presenting twice changes nothing
    assert nb["cells"][3]["metadata"] == {}  # the input is not modified


def test_jumprelu_saes_take_the_budget_of_the_topk_saes_they_are_compared_with(monkeypatch):
    import sae_repro.chapter as chapter_module

    seen = []
    monkeypatch.setattr(chapter_module, "trained_jumprelu", lambda store, cfg, **kw: seen.append(cfg))
    p = profile("ci")
    analysis, gradient = (Chapter.open(n, _namespace()) for n in ("dark_matter_jumprelu", "cross_paper"))
    with pytest.raises(ValueError, match="stores"):
        analysis.jumprelu()
    for ch, kind in ((analysis, "analysis"), (gradient, "gradient")):
        ch._kind, ch.stores = kind, {"train": None}  # what _opened sets (without reading stores)
        ch._heldout[ch.hook] = None  # what heldout() would read from the test store
    analysis.jumprelu(2)
    gradient.jumprelu(seed=3)
    a, g = seen
    assert (a.expansion, a.target_l0, a.batch_size, a.epochs) == (2, p["main_k"], p["sae_batch_size"], p["main_epochs"])
    want = (p["main_expansion"], p["zoo_batch_size"], p["zoo_epochs"], 3)
    assert (g.expansion, g.batch_size, g.epochs, g.seed) == want
    assert a.lr == g.lr == p["sae_lr"]
    calls = []
    monkeypatch.setattr(chapter_module, "trained_jumprelu", lambda data, cfg, **kw: calls.append((data, cfg, kw)))
    part, held = torch.zeros(4, 2), torch.ones(3, 2)
    analysis.jumprelu(data=part, data_key="linear error", heldout=held, target_l0=8.0)
    assert calls[-1][0] is part and calls[-1][2] == {"data_key": "linear error", "heldout": held}
    assert calls[-1][1].target_l0 == 8.0 and calls[-1][1].epochs == p["main_epochs"]
    analysis._heldout["blocks.0.hook_mlp_out"] = "mlp held-out"
    analysis.jumprelu(hook="blocks.0.hook_mlp_out", epochs=1.0)
    assert calls[-1][2] == {"hook": "blocks.0.hook_mlp_out", "heldout": "mlp held-out"}
    assert calls[-1][1].epochs == 1.0
