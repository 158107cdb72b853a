"""MkDocs hooks: the Guide and Benchmarks pages are README.md/BENCHMARKS.md.

The repository's own Markdown files are read at build time, so the site
never holds a stale copy. Their links are relative to the repository root:
links to the two files become links to their pages, links into `docs/`
become links within the site, and links to other repository files (which
the site does not contain) become their plain text. Options after a code
fence's language (e.g. `python devices=8`, read by tests/test_readme.py)
are dropped.
"""

import os
import re
from typing import Any

# Site page -> repository file it shows.
INCLUDED = {"guide.md": "README.md", "benchmarks.md": "BENCHMARKS.md"}
PAGE_OF = {source: page for page, source in INCLUDED.items()}
LINK = re.compile(r"(!?)\[([^\]]*)\]\(([^)\s]+)\)")
FENCE_OPTIONS = re.compile(r"^(\s*```+[\w+-]+)[ \t]+[^\n`]*$", re.MULTILINE)


def site_link(match: re.Match) -> str:
  """One Markdown link of a repository file, rewritten for the site."""
  bang, text, target = match.groups()
  if re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*:|#", target):  # URL or anchor
    return match.group(0)
  path, hash_, anchor = target.partition("#")
  if path in PAGE_OF:
    path = PAGE_OF[path]
  elif path.startswith("docs/"):
    path = path[len("docs/") :]
  elif not bang:
    return text  # a repository file the site does not hold
  return f"{bang}[{text}]({path}{hash_}{anchor})"


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
  del files  # unused
  source = INCLUDED.get(page.file.src_uri)
  if source is None:
    return markdown
  root = os.path.dirname(config["config_file_path"])
  with open(os.path.join(root, source), encoding="utf-8") as f:
    text = f.read()
  return LINK.sub(site_link, FENCE_OPTIONS.sub(r"\1", text))
