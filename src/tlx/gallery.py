"""The audit's page: one self-contained HTML file, a thumbnail gallery for each kind of finding.

Thumbnails are embedded (base64 JPEG), so the page shows the same wherever the folder is copied.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

#: the most findings of one kind the page shows (the CSV files hold them all)
PER_SECTION = 60
#: the longest side of a thumbnail, in pixels
THUMBNAIL = 160

STYLE = """
body { font: 14px system-ui, sans-serif; margin: 1.5rem; color: #222; }
h1 { font-size: 1.4rem; } h2 { font-size: 1.1rem; margin-top: 2rem; }
.grid { display: flex; flex-wrap: wrap; gap: 12px; }
figure { margin: 0; padding: 6px; border: 1px solid #ddd; border-radius: 6px; width: 172px; }
figure.pair { width: 344px; } .pair .images { display: flex; gap: 4px; }
figure img { max-width: 160px; max-height: 160px; display: block; }
figcaption { font-size: 12px; overflow-wrap: anywhere; }
.missing { width: 160px; height: 100px; background: #eee; color: #888; display: flex;
           align-items: center; justify-content: center; }
.leak { color: #b00; font-weight: 600; }
"""


def gallery(
    summary: dict[str, Any],
    labels: list[dict[str, Any]],
    pairs: list[dict[str, Any]],
    outliers: list[dict[str, Any]],
) -> str:
    """The page for an audit's ``summary`` and the rows of its three CSV files."""
    images = summary["images"]
    flagged = [r for r in labels if r["flagged"]]
    leaks = [p for p in pairs if p["split_a"] != p["split_b"]]
    within = [p for p in pairs if p["split_a"] == p["split_b"]]
    far = [r for r in outliers if r["flagged"]]
    sections = [
        _section(
            "label-issues",
            f"Label issues: {len(flagged)} of {images['train']} training images",
            [
                _figure(
                    r["path"],
                    f"given <b>{_e(r['given_label'])}</b>, looks like <b>{_e(r['suggested_label'])}</b>"
                    f"<br>label quality {r['label_quality']:.3f}",
                )
                for r in flagged[:PER_SECTION]
            ],
            len(flagged),
            "label_issues.csv",
        ),
        _section(
            "leakage",
            f"Leakage: {len(leaks)} pair(s) across the splits",
            [_pair(p) for p in leaks[:PER_SECTION]],
            len(leaks),
            "duplicates.csv",
        ),
        _section(
            "duplicates",
            f"Duplicates within a split: {len(within)} pair(s)",
            [_pair(p) for p in within[:PER_SECTION]],
            len(within),
            "duplicates.csv",
        ),
        _section(
            "outliers",
            f"Outliers: {len(far)} image(s) far from every training image",
            [
                _figure(r["path"], f"{_e(r['split'])}, {_e(r['label'])}<br>score {r['score']:.3f}")
                for r in far[:PER_SECTION]
            ],
            len(far),
            "outliers.csv",
        ),
    ]
    return (
        "<!doctype html>\n<html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>tlx audit: {_e(summary['recipe'])}</title><style>{STYLE}</style></head><body>"
        f"<h1>tlx audit of {_e(summary['recipe'])}</h1>"
        f"<p>{images['train']} training and {images['test']} test images, classes "
        f"{_e(', '.join(images['classes']))}; {summary['seconds']:.1f} s.</p>"
        + "".join(sections)
        + "</body></html>\n"
    )


def _section(anchor: str, title: str, items: list[str], total: int, csv_name: str) -> str:
    more = f"<p>and {total - len(items)} more in {csv_name}</p>" if total > len(items) else ""
    body = f"<div class='grid'>{''.join(items)}</div>{more}" if items else "<p>none found</p>"
    return f"<section id='{anchor}'><h2>{_e(title)}</h2>{body}</section>"


def _figure(path: str, caption: str) -> str:
    return f"<figure>{_thumbnail(path)}<figcaption>{_e(Path(path).name)}<br>{caption}</figcaption></figure>"


def _pair(row: dict[str, Any]) -> str:
    cross = row["split_a"] != row["split_b"]
    kind = f"<span class='leak'>{_e(row['kind'])}, leakage</span>" if cross else _e(row["kind"])
    return (
        f"<figure class='pair'><div class='images'>{_thumbnail(row['path_a'])}"
        f"{_thumbnail(row['path_b'])}</div>"
        f"<figcaption>{_e(Path(row['path_a']).name)} ({_e(row['split_a'])}) ~ {_e(Path(row['path_b']).name)} "
        f"({_e(row['split_b'])})<br>{kind}, similarity {row['similarity']:.3f}</figcaption></figure>"
    )


def _thumbnail(path: str) -> str:
    """The image as an embedded JPEG thumbnail, or a grey box saying it cannot be shown."""
    from tlx.data import load_image

    try:
        image = load_image(Path(path))
        image.thumbnail((THUMBNAIL, THUMBNAIL))
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=80)
    except Exception:  # a file that changed or vanished since the audit read it
        return "<div class='missing'>not readable</div>"
    data = base64.b64encode(buffer.getvalue()).decode()
    return f"<img alt='{_e(Path(path).name)}' src='data:image/jpeg;base64,{data}'>"


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)
