"""The report as one self-contained HTML page: inline CSS, PNGs as data URIs, no external asset.

A quality engineer mails it, opens it on a machine without network, or archives it with the
bundle; anything it linked to would be gone by then. Every figure comes from the report document
(the JSON written next to it).
"""

from __future__ import annotations

import base64
from html import escape

WIDE_PLOTS = ("histogram", "per_type")  # span both columns (drawn twice as wide)
CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1180px;color:#222;padding:0 16px}
h1{font-size:22px;margin-bottom:4px} h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd;padding-bottom:4px}
.meta{color:#555;font-size:13px;line-height:1.5}
.verdict{display:flex;gap:16px;margin:16px 0}
.kpi{flex:1;border-radius:6px;padding:12px 16px;background:#f4f4f4}
.kpi .big{font-size:28px;font-weight:600} .kpi .sub{font-size:13px;color:#444}
.kpi.frr{border-left:6px solid #1b8a3a} .kpi.esc{border-left:6px solid #c62828}
table{border-collapse:collapse;font-size:13px;margin:8px 0}
th,td{border:1px solid #ddd;padding:4px 8px;text-align:right} th{background:#f4f4f4}
td.l,th.l{text-align:left}
.plots{display:grid;grid-template-columns:1fr 1fr;gap:12px} .plots img{width:100%;border:1px solid #eee}
.plots .wide{grid-column:1 / span 2}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(360px,1fr));gap:12px}
.card{border:1px solid #ddd;border-radius:6px;padding:8px;font-size:12px}
.card img{width:100%;image-rendering:auto} .card .tag{font-weight:600}
.miss{color:#c62828} .ok{color:#1b8a3a}
.note{font-size:12px;color:#555}
"""


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def _rate(r: dict) -> str:
    if r["n"] == 0:
        return "—"
    return f"{r['count']}/{r['n']} = {_pct(r['rate'])} [{_pct(r['ci_low'])}, {_pct(r['ci_high'])}]"


def _num(x: float | None) -> str:
    return "—" if x is None else f"{x:.3f}"


def _meta(doc: dict) -> str:
    b, d, t = doc["bundle"], doc["dataset"], doc["bundle"]["threshold"]
    counts = ", ".join(f"{escape(k)} {v}" for k, v in d["counts"].items())
    quantile = ""
    if t.get("quantile") is not None:
        quantile = f", quantile {t['quantile']:g}" + (f" of {t['n_images']} images" if t.get("n_images") else "")
    return (
        f"<div class='meta'>bundle <b>{escape(b['path'])}</b> · {escape(str(b['profile']))} · "
        f"branches {escape('+'.join(b['branches']))} · {escape(str(b['precision']))} · {b['shots']} shot(s) · "
        f"manifest sha256 {escape(b['manifest_sha256'][:16])}…<br>"
        f"threshold {t['value']:.4g}: {escape(str(t.get('method', '')))}{quantile}<br>"
        + _lineage(b.get("lineage")) +
        f"data set <b>{escape(d['name'])}</b> / {escape(d['category'])} ({escape(d['root'])}): "
        f"{doc['n_test']} test images: {counts}<br>"
        + "".join(f"{escape(str(k))}: {escape(str(v))}<br>" for k, v in doc.get("provenance", {}).items())
        + f"generated {escape(doc['created'])} by o2n-edge {escape(doc['o2n_edge_version'])} on "
        f"{escape(', '.join(doc['providers']))} in {doc['wall_s']:.0f} s</div>"
    )


def _lineage(lin: dict | None) -> str:
    """The header line of a learned bundle: its parent and the images added to its bank, by rule."""
    if not lin:
        return ""
    rules: dict[str, int] = {}
    for a in lin["added"]:
        rules[a["rule"]] = rules.get(a["rule"], 0) + 1
    shas = ", ".join(escape(str(a["sha256"])[:12]) for a in lin["added"][:20])
    more = f" and {len(lin['added']) - 20} more" if len(lin["added"]) > 20 else ""
    return (f"lineage: learned {escape(str(lin['created_at']))} from parent {escape(lin['parent_hash'][:16])}… "
            f"({escape(str(lin['parent_path']))}); {len(lin['added'])} images added "
            f"({escape(', '.join(f'{n} {r}' for r, n in rules.items()))}; {lin['earlier']} by earlier generations): "
            f"{shas}{more}<br>")


def _verdict(doc: dict) -> str:
    op = doc["at_bundle_threshold"]
    fr, es = op["false_reject"], op["escape"]
    conf = f"{100 * doc['confidence']:g}%"
    return (
        "<div class='verdict'>"
        f"<div class='kpi frr'><div class='sub'>good parts rejected at the bundle's threshold</div>"
        f"<div class='big'>{_pct(fr['rate'])}</div><div class='sub'>{fr['count']} of {fr['n']} · "
        f"{conf} CI {_pct(fr['ci_low'])} – {_pct(fr['ci_high'])}</div></div>"
        f"<div class='kpi esc'><div class='sub'>defects passed (escapes) at the bundle's threshold</div>"
        f"<div class='big'>{_pct(es['rate'])}</div><div class='sub'>{es['count']} of {es['n']} · "
        f"{conf} CI {_pct(es['ci_low'])} – {_pct(es['ci_high'])}</div></div></div>"
    )


def _operating_table(doc: dict) -> str:
    rows = [("bundle's calibrated threshold", doc["at_bundle_threshold"]),
            (f"threshold for ≤ {100 * doc['target_frr']:g}% false rejects on this test set", doc["at_target_frr"])]
    body = "".join(
        f"<tr><td class='l'>{escape(name)}</td><td>{op['threshold']:.4g}</td>"
        f"<td>{_rate(op['false_reject'])}</td><td>{_rate(op['escape'])}</td></tr>"
        for name, op in rows
    )
    conf = f"{100 * doc['confidence']:g}%"
    return (
        f"{_calibration_note(doc)}"
        f"<table><tr><th class='l'>operating point</th><th>threshold</th><th>false rejects (good parts rejected), "
        f"{conf} CI</th><th>escapes (defects passed), {conf} CI</th></tr>{body}</table>"
        "<p class='note'>An image is rejected when its score is above the threshold. Intervals are "
        "Clopper-Pearson (exact binomial). The second threshold is chosen on these test images, so its "
        "escape rate is optimistic for new images; the bundle's threshold was calibrated on held-out good "
        "images only.</p>"
    )


def _calibration_note(doc: dict) -> str:
    """Say so when the calibration set is too small for its quantile: one image then sets the threshold."""
    t = doc["bundle"]["threshold"]
    q, n = t.get("quantile"), t.get("n_images")
    if q is None or not n or n * (1.0 - q) >= 1.0:
        return ""
    return (f"<p class='note'>The bundle's threshold is the {q:g} quantile of {n} held-out good images' scores: "
            f"with fewer than {round(1 / (1 - q))} images it lies between the two highest of them, so a single "
            "unusual good image sets it.</p>")


def _type_table(doc: dict) -> str:
    pixel = any(r["pixel_auroc"] is not None for r in doc["per_type"])
    head = ("<tr><th class='l'>defect type</th><th>images</th><th>escapes at the bundle's threshold</th>"
            f"<th>escapes at the {100 * doc['target_frr']:g}% FRR threshold</th><th>image AUROC</th>"
            + ("<th>pixel AUROC</th><th>PRO (0.3)</th>" if pixel else "") + "</tr>")
    body = ""
    for r in doc["per_type"]:
        body += (f"<tr><td class='l'>{escape(r['defect'])}</td><td>{r['n']}</td><td>{_rate(r['escape'])}</td>"
                 f"<td>{_rate(r['escape_at_target'])}</td><td>{_num(r['image_auroc'])}</td>"
                 + (f"<td>{_num(r['pixel_auroc'])}</td><td>{_num(r['pixel_pro'])}</td>" if pixel else "") + "</tr>")
    m = doc["metrics"]
    body += (f"<tr><th class='l'>all defects</th><th>{doc['n_defective']}</th>"
             f"<th>{_rate(doc['at_bundle_threshold']['escape'])}</th><th>{_rate(doc['at_target_frr']['escape'])}</th>"
             f"<th>{_num(m['image_auroc'])}</th>"
             + (f"<th>{_num(m['pixel_auroc'])}</th><th>{_num(m['pixel_pro'])}</th>" if pixel else "") + "</tr>")
    return (f"<table>{head}{body}</table><p class='note'>Per type: that type's images against every good "
            f"test image ({doc['n_good']}). All images: image AP {_num(m['image_ap'])}, "
            f"F1-max {_num(m['image_f1max'])} (F1-max picks its threshold on the test set).</p>")


def _plots(plots: dict[str, bytes]) -> str:
    cells = []
    for name, png in plots.items():
        cls = " class='wide'" if name in WIDE_PLOTS else ""
        cells.append(f"<div{cls}><img alt='{escape(name)}' src='{data_uri(png)}'></div>")
    return f"<div class='plots'>{''.join(cells)}</div>"


def _gallery(cards: list[dict], empty: str) -> str:
    if not cards:
        return f"<p class='note'>{escape(empty)}</p>"
    out = []
    for c in cards:
        cls = "miss" if c["miss"] else "ok"
        out.append(
            f"<div class='card'><img alt='{escape(c['file'])}' src='{data_uri(c['jpeg'], 'image/jpeg')}'>"
            f"<div><span class='tag {cls}'>{escape(c['tag'])}</span> · score {c['score']:.4f} · "
            f"{escape(c['file'])}</div></div>"
        )
    return f"<div class='gallery'>{''.join(out)}</div>"


def _image_table(doc: dict) -> str:
    rows = sorted(doc["images"], key=lambda r: -r["score"])
    body = "".join(
        f"<tr><td class='l'>{escape(r['file'])}</td><td class='l'>{escape(r['defect'])}</td><td>{r['score']:.4f}</td>"
        f"<td class='l {'miss' if r['rejected'] != bool(r['label']) else 'ok'}'>"
        f"{'rejected' if r['rejected'] else 'passed'}</td></tr>"
        for r in rows
    )
    return (f"<details><summary>every test image ({len(rows)}), highest score first</summary><table>"
            f"<tr><th class='l'>file</th><th class='l'>type</th><th>score</th><th class='l'>at the bundle's threshold</th>"
            f"</tr>{body}</table></details>")


def render_page(doc: dict, plots: dict[str, bytes], gallery: dict[str, list[dict]]) -> str:
    """The whole page; ``gallery`` cards carry their JPEG strip (query | normal version | overlay)."""
    b = doc["bundle"]
    panels = "query | normal version | heat-map overlay" if b["has_normal_version"] else "query | heat-map overlay"
    title = f"{b['category']} · acceptance report"
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{escape(title)}</title><style>{CSS}</style></head><body>"
        f"<h1>{escape(title)}</h1>{_meta(doc)}{_verdict(doc)}"
        f"<h2>Operating points</h2>{_operating_table(doc)}"
        f"<h2>Per defect type</h2>{_type_table(doc)}"
        f"<h2>Plots</h2>{_plots(plots)}"
        f"<p class='note'>Gallery heat maps share one colour scale (map values {doc['gallery']['map_range'][0]:.2f} "
        f"to {doc['gallery']['map_range'][1]:.2f}), so the same colour is the same evidence on every card.</p>"
        f"<h2>Worst escapes</h2><p class='note'>The lowest-scoring defective images ({escape(panels)}); "
        "those at or below the bundle's threshold are escapes.</p>"
        f"{_gallery(gallery['escapes'], 'no defective image in the test set')}"
        f"<h2>Worst false rejects</h2><p class='note'>The highest-scoring good images ({escape(panels)}); "
        "those above the bundle's threshold are false rejects.</p>"
        f"{_gallery(gallery['false_rejects'], 'no good image in the test set')}"
        f"<h2>Every image</h2>{_image_table(doc)}"
        "</body></html>\n"
    )
