#!/usr/bin/env python3
"""Every relative link in the repository's Markdown files resolves.

A link `[text](path)`, an image `![alt](path)` or a reference definition
`[name]: path` that is not a URL must name a file or directory that exists,
relative to the Markdown file; a `#fragment` must name a heading of the target
Markdown file (GitHub's anchors: lower case, punctuation dropped, spaces to
hyphens, `-1`, `-2` for repeats). Links inside code are not links.

    python3 scripts/check-markdown-links.py      # exit 1 and a list if any is broken

Run by `.ci/run`.
"""

import os
import re
import subprocess
import sys
from urllib.parse import unquote

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

INLINE = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
FENCE = re.compile(r"^\s{0,3}(```|~~~)")


def markdown_files():
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.md"],
        cwd=ROOT, check=True, capture_output=True, text=True,
    ).stdout
    return sorted(p for p in out.splitlines() if os.path.exists(os.path.join(ROOT, p)))


def prose_lines(text):
    """(line number, line) outside fenced code blocks, inline code removed."""
    fenced = None
    for n, line in enumerate(text.splitlines(), 1):
        m = FENCE.match(line)
        if m:
            if fenced is None:
                fenced = m.group(1)
            elif m.group(1) == fenced:
                fenced = None
            continue
        if fenced is None:
            yield n, re.sub(r"`[^`]*`", "", line)


def slug(heading):
    text = re.sub(r"<[^>]+>", "", heading)            # inline HTML
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)  # links keep their text
    text = text.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


_anchors = {}


def anchors(path):
    if path not in _anchors:
        seen = {}
        found = set()
        with open(path, encoding="utf-8") as f:
            text = f.read()
        fenced = None
        for line in text.splitlines():
            m = FENCE.match(line)
            if m:
                fenced = m.group(1) if fenced is None else (None if m.group(1) == fenced else fenced)
                continue
            if fenced is not None:
                continue
            h = HEADING.match(line)
            if h:
                s = slug(h.group(2))
                n = seen.get(s, 0)
                seen[s] = n + 1
                found.add(s if n == 0 else f"{s}-{n}")
        for m in re.finditer(r"<a\s+(?:name|id)=\"([^\"]+)\"", text):
            found.add(m.group(1))
        _anchors[path] = found
    return _anchors[path]


def check(md):
    problems = []
    here = os.path.dirname(os.path.join(ROOT, md))
    with open(os.path.join(ROOT, md), encoding="utf-8") as f:
        text = f.read()
    for n, line in prose_lines(text):
        targets = [m.group(1) for m in INLINE.finditer(line)]
        r = REFERENCE.match(line)
        if r:
            targets.append(r.group(1))
        for target in targets:
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, mailto:, ...
                continue
            path, _, fragment = target.partition("#")
            path = unquote(path)
            full = os.path.normpath(os.path.join(here, path)) if path else os.path.join(ROOT, md)
            if not os.path.exists(full):
                problems.append(f"{md}:{n}: {target}: no such file")
            elif fragment and full.endswith(".md") and unquote(fragment).lower() not in anchors(full):
                problems.append(f"{md}:{n}: {target}: no heading #{fragment} in {os.path.relpath(full, ROOT)}")
    return problems


def main():
    files = markdown_files()
    problems = [p for md in files for p in check(md)]
    for p in problems:
        print(p, file=sys.stderr)
    print(f"{len(files)} Markdown files, {len(problems)} broken relative links")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
