"""Self-contained HTML views of tokens and latents (inline CSS and script: no CDN, works offline).

- `token_view`: held-out contexts as text, each token shaded by a chosen quantity (a menu switches
  between quantities, e.g. an error norm under several SAEs, or latents per token), the token and
  its number shown on hover.
- `cards_view`: latent cards (`sae_repro.latents.Card`): density, top-activating contexts with
  each token shaded by the latent's activation (the activating token outlined), and the tokens
  whose logits the latent's decoder direction raises and lowers most.
- `side_by_side`: the cards of several SAEs in columns.
- `page`: a fragment as a standalone HTML document.

Every view is a fragment rooted at `<div class="sae-view" id=...>`, so several can share a page;
hovering a token writes "token - quantity: value" into the view's `.sae-hover` box.
"""

from __future__ import annotations

import html
import json
import math
from typing import Sequence

from sae_repro.latents import Card

CSS = """
.sae-view{font-family:system-ui,sans-serif;font-size:14px;line-height:1.9;max-width:100%}
.sae-view .sae-bar{position:sticky;top:0;background:#fff;padding:4px 0;z-index:1}
.sae-view .sae-hover{display:inline-block;min-width:18em;margin-left:1em;color:#333;font-family:monospace}
.sae-view .sae-ctx{margin:6px 0;padding:4px 6px;border-left:3px solid #ddd;word-wrap:break-word}
.sae-view .sae-tok{white-space:pre-wrap;border-radius:2px;cursor:default}
.sae-view .sae-tok.sae-at{outline:2px solid #222}
.sae-view .sae-cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(300px,1fr));gap:10px}
.sae-view .sae-cols{display:grid;gap:10px}
.sae-view .sae-card{border:1px solid #ccc;border-radius:6px;padding:6px 8px;font-size:13px;line-height:1.7}
.sae-view .sae-card h4{margin:0 0 2px 0;font-size:14px}
.sae-view .sae-card .sae-meta{color:#555;font-size:12px}
.sae-view .sae-card table{border-collapse:collapse;font-size:12px;margin-top:4px}
.sae-view .sae-card td{padding:0 6px;font-family:monospace;white-space:pre}
"""

# Paints each token by the selected quantity (the value over that quantity's largest in the
# view) and fills the hover box; tokens carry their values as data-v="v0,v1,...".
SCRIPT = """
(function(){
var root=document.getElementById(%(id)s), labels=%(labels)s, maxes=%(maxes)s;
var sel=root.querySelector('select'), box=root.querySelector('.sae-hover');
function q(){return sel?+sel.value:0;}
function val(t){return +t.getAttribute('data-v').split(',')[q()];}
function paint(){
  root.querySelectorAll('.sae-tok').forEach(function(t){
    var m=+(t.getAttribute('data-max')||maxes[q()]), v=val(t);
    var a=(isFinite(v)&&m>0)?Math.min(1,Math.max(0,v)/m):0;
    t.style.background='rgba(214,69,30,'+(0.85*a).toFixed(3)+')';
  });
}
if(sel){sel.addEventListener('change',paint);}
root.addEventListener('mouseover',function(e){
  var t=e.target.closest('.sae-tok'); if(!t){return;}
  box.textContent=JSON.stringify(t.textContent)+' \\u2014 '+labels[q()]+': '+t.getAttribute('data-v').split(',')[q()];
});
paint();
})();
"""


def _text(token: str) -> str:
    return html.escape(token.replace("\n", "\u21b5"))


def _num(v: float) -> str:
    return "nan" if not math.isfinite(v) else f"{v:.4g}"


def _alpha(v: float, vmax: float) -> str:
    a = 0.0 if not (math.isfinite(v) and vmax > 0) else min(1.0, max(0.0, v) / vmax)
    return f"background:rgba(214,69,30,{0.85 * a:.3f})"


def _tok(token: str, values: Sequence[float], vmax: float, *, at: bool = False,
         own_max: bool = False) -> str:
    cls = "sae-tok sae-at" if at else "sae-tok"
    extra = f' data-max="{vmax:.6g}"' if own_max else ""
    return (f'<span class="{cls}" data-v="{",".join(_num(v) for v in values)}"{extra} '
            f'style="{_alpha(values[0], vmax)}">{_text(token)}</span>')


def _js(value: object) -> str:
    """JSON safe inside <script>: a label holding "</script>" must not end the element."""
    return json.dumps(value).replace("<", "\\u003c")


def _script(view_id: str, labels: list[str], maxes: list[float]) -> str:
    return "<script>" + SCRIPT % {"id": _js(view_id), "labels": _js(labels),
                                   "maxes": _js([m if math.isfinite(m) else 0 for m in maxes])} + "</script>"


def _check_id(view_id: str) -> None:
    if not view_id or not view_id.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"view_id={view_id!r}: use letters, digits, '-' and '_' only")


def _view(view_id: str, title: str, control: str, body: str, labels: list[str], maxes: list[float]) -> str:
    """The shell every view shares: root div, style, title, the bar (control + hover box), script."""
    _check_id(view_id)
    head = f"<h3>{html.escape(title)}</h3>" if title else ""
    return (f'<div class="sae-view" id="{view_id}"><style>{CSS}</style>{head}'
            f'<div class="sae-bar">{control}<span class="sae-hover">hover a token for its '
            f'{"value" if control else "activation"}</span></div>{body}</div>' + _script(view_id, labels, maxes))


def token_view(texts: Sequence[Sequence[str]], quantities: dict[str, Sequence[Sequence[float]]], *,
               view_id: str, title: str = "") -> str:
    """Contexts as shaded text. texts: [n_ctx][n_tok] token strings; quantities: label ->
    [n_ctx][n_tok] values (>= 0 shaded; NaN unshaded), the first shown first."""
    if not quantities:
        raise ValueError("token_view: give at least one quantity")
    labels = list(quantities)
    for name, q in quantities.items():
        if len(q) != len(texts) or any(len(a) != len(b) for a, b in zip(q, texts)):
            raise ValueError(f"token_view: quantity {name!r} does not have the texts' shape "
                             f"(one value per token of each of the {len(texts)} contexts)")
    maxes = [max((float(v) for row in quantities[n] for v in row if math.isfinite(float(v))), default=0.0)
             for n in labels]
    options = "".join(f'<option value="{i}">{html.escape(n)}</option>' for i, n in enumerate(labels))
    rows = []
    for c, toks in enumerate(texts):
        spans = "".join(_tok(t, [float(quantities[n][c][i]) for n in labels], maxes[0])
                        for i, t in enumerate(toks))
        rows.append(f'<div class="sae-ctx">{spans}</div>')
    return _view(view_id, title, f"<label>shade by <select>{options}</select></label>", "".join(rows),
                 labels, maxes)


def _card(c: Card) -> str:
    top = max((max(a) for _, a, _ in c.examples), default=0.0)
    examples = "".join(
        '<div class="sae-ctx">' + "".join(_tok(t, [a], top, at=(i == at), own_max=True)
                                          for i, (t, a) in enumerate(zip(toks, acts))) + "</div>"
        for toks, acts, at in c.examples)
    rows = "".join(f"<tr><td>{_text(u)} {up:+.2f}</td><td>{_text(d)} {down:+.2f}</td></tr>"
                   for (u, up), (d, down) in zip(c.raises, c.lowers))
    steer = ""
    if c.steering:
        s = c.steering
        steer = (f'<div class="sae-meta">steering (added norm {float(s["scale"]):.3g}): KL '
                 f'{float(s["kl_per_norm"]):.3g} nats per unit norm; log p({_text(str(s["target"]))}) '
                 f'{float(s["target_logprob_delta"]):+.3g}</div>')
    return (f'<div class="sae-card"><h4>{html.escape(c.sae)} \u00b7 latent {c.latent}</h4>'
            f'<div class="sae-meta">density {100 * c.density:.3g}% ({c.firings} held-out firings); '
            f"top activations, outlined token activating</div>{examples}"
            f"<table><tr><th>logits raised</th><th>logits lowered</th></tr>{rows}</table>{steer}</div>")


def cards_view(cards: Sequence[Card], *, view_id: str, title: str = "") -> str:
    """A grid of latent cards; hovering a context token shows its activation of the latent."""
    return _view(view_id, title, "", f'<div class="sae-cards">{"".join(_card(c) for c in cards)}</div>',
                 ["activation"], [0.0])


def side_by_side(cards: dict[str, Sequence[Card]], *, view_id: str, title: str = "") -> str:
    """The cards of several SAEs in one column each (name -> cards), for the same number of latents."""
    cols = "".join(f'<div><h3>{html.escape(name)}</h3>{"".join(_card(c) for c in cs)}</div>'
                   for name, cs in cards.items())
    grid = f"grid-template-columns:repeat({len(cards)},minmax(240px,1fr))"
    return _view(view_id, title, "", f'<div class="sae-cols" style="{grid}">{cols}</div>',
                 ["activation"], [0.0])


def page(fragment: str, title: str) -> str:
    """A standalone HTML document around a view fragment."""
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{html.escape(title)}</title></head>"
            f'<body style="margin:16px">{fragment}</body></html>\n')
