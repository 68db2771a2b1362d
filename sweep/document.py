"""The report as a list of blocks ("h1", text), ("p", text), ("figure", name, title),
("table", header, rows), written as Markdown and as HTML. Two small writers instead of a
Markdown dependency: the blocks are few and fixed."""

from __future__ import annotations

import html


def to_markdown(blocks: list) -> str:
    out = []
    for kind, *rest in blocks:
        if kind in ("h1", "h2"):
            out.append(f"{'#' * int(kind[1])} {rest[0]}\n")
        elif kind == "p":
            out.append(f"{rest[0]}\n")
        elif kind == "figure":
            name, title = rest
            out.append(f"![{title}]({name}.png)\n\n[{title} (interactive)]({name}.html)\n")
        elif kind == "table":
            header, rows = rest
            cell = lambda v: str(v).replace("|", "\\|").replace("\n", " ")  # noqa: E731
            lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
            out.append("\n".join(lines) + "\n")
    return "\n".join(out)


def to_html(blocks: list, title: str) -> str:
    esc = html.escape
    out = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}"
        "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;"
        "padding:3px 6px;vertical-align:top}img{max-width:100%}</style></head><body>",
    ]
    for kind, *rest in blocks:
        if kind in ("h1", "h2"):
            out.append(f"<{kind}>{esc(rest[0])}</{kind}>")
        elif kind == "p":
            out.append(f"<p>{esc(rest[0])}</p>")
        elif kind == "figure":
            name, caption = rest
            out.append(
                f"<figure><a href='{name}.html'><img src='{name}.png' alt='{esc(caption)}'>"
                f"</a><figcaption>{esc(caption)} (click: interactive)</figcaption></figure>"
            )
        elif kind == "table":
            header, rows = rest
            out.append("<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>")
            out += [
                "<tr>" + "".join(f"<td>{esc(str(v))}</td>" for v in row) + "</tr>" for row in rows
            ]
            out.append("</table>")
    return "\n".join(out) + "</body></html>\n"
