"""MkDocs hooks: the Guide, Benchmarks and Notebook pages are repository files.

README.md, BENCHMARKS.md and notebooks/quickstart.ipynb are read at build
time, so the site never holds a stale copy. Their links are relative to the
repository root: links to the included files become links to their pages,
links into `docs/` become links within the site (a folder's link goes to its
README.md or index.md), and links to other repository files (which the site
does not contain) become their plain text. The pages of `docs/` link
relative to themselves, so that their links also work on GitHub; those that
leave `docs/` (`../README.md#install`, `../BENCHMARKS.md`) are rewritten by
the same rules. Options after a code fence's language (e.g.
`python devices=8`, read by tests/test_readme.py) are dropped on every
page. The notebook is shown with the outputs stored in it (it is
committed executed; the build does not run it): its Markdown cells as they
are, code cells as Python blocks, text outputs as text blocks and PNG
outputs as images.
"""

import json
import os
import posixpath
import re
from typing import Any

# Site page -> repository file it shows.
INCLUDED = {
  "guide.md": "README.md",
  "benchmarks.md": "BENCHMARKS.md",
  "notebook.md": "notebooks/quickstart.ipynb",
}
PAGE_OF = {source: page for page, source in INCLUDED.items()}
DOCS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "docs")
FOLDER_PAGES = ("README.md", "index.md")
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
    if path.endswith("/"):  # a folder: its page
      path += next(
        (
          p for p in FOLDER_PAGES if os.path.exists(os.path.join(DOCS, path, p))
        ),
        FOLDER_PAGES[0],
      )
  elif not bang:
    return text  # a repository file the site does not hold
  return f"{bang}[{text}]({path}{hash_}{anchor})"


def docs_page_link(match: re.Match, page: str) -> str:
  """One Markdown link of `docs/<page>`, rewritten for the site.

  Links within `docs/` stay as they are; a link that leaves it is read from
  the repository root (see `site_link`) and made relative to the page again.
  """
  bang, text, target = match.groups()
  if re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*:|#", target):  # URL or anchor
    return match.group(0)
  path, hash_, anchor = target.partition("#")
  folder = posixpath.dirname(page)
  in_repo = posixpath.normpath(posixpath.join("docs", folder, path))
  if in_repo == "docs" or in_repo.startswith("docs/"):
    return match.group(0)
  rewritten = site_link(
    LINK.fullmatch(f"{bang}[{text}]({in_repo}{hash_}{anchor})")
  )
  found = LINK.fullmatch(rewritten)
  if found is None:  # plain text: a repository file the site does not hold
    return rewritten
  site_path, hash_, anchor = found.group(3).partition("#")
  relative = posixpath.relpath(site_path, folder or ".")
  return f"{bang}[{text}]({relative}{hash_}{anchor})"


def _text(value: Any) -> str:
  return value if isinstance(value, str) else "".join(value)


def notebook_markdown(notebook: dict[str, Any]) -> str:
  """A notebook (nbformat 4 JSON) as Markdown, with its stored outputs."""
  parts = []
  for cell in notebook["cells"]:
    source = _text(cell["source"]).rstrip()
    if cell["cell_type"] == "markdown":
      parts.append(source)
      continue
    if cell["cell_type"] != "code":
      continue
    if source:
      parts.append(f"```python\n{source}\n```")
    for output in cell.get("outputs", []):
      data = output.get("data", {})
      if "image/png" in data:
        png = _text(data["image/png"]).replace("\n", "")
        parts.append(f'<img alt="output" src="data:image/png;base64,{png}">')
        continue
      text = output.get("text") or data.get("text/plain")
      if output.get("output_type") == "error":
        text = f"{output.get('ename')}: {output.get('evalue')}"
      if text and not _text(text).startswith("<"):
        parts.append(f"```text\n{_text(text).rstrip()}\n```")
  return "\n\n".join(parts) + "\n"


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
  del files  # unused
  source = INCLUDED.get(page.file.src_uri)
  if source is None:
    markdown = FENCE_OPTIONS.sub(r"\1", markdown)
    return LINK.sub(lambda m: docs_page_link(m, page.file.src_uri), markdown)
  root = os.path.dirname(config["config_file_path"])
  with open(os.path.join(root, source), encoding="utf-8") as f:
    text = f.read()
  if source.endswith(".ipynb"):
    return notebook_markdown(json.loads(text))
  return LINK.sub(site_link, FENCE_OPTIONS.sub(r"\1", text))
