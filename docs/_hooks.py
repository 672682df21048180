"""MkDocs hooks (mkdocs.yml ``hooks:``) for the results files the pages link to.

The pages link to ``../benchmarks/results/...`` (tables, plots, JSON), outside ``docs/``, so that the
links also work when GitHub shows ``docs/*.md``. For the site, those files are copied as they are
(markdown files included: shown as text, not rendered as pages) and the links are pointed at the copies.
"""
from __future__ import annotations

import os
import re

from mkdocs.structure.files import File

RESULTS = os.path.join("benchmarks", "results")
_LINK = re.compile(r"\]\(\.\./benchmarks/results/")


class _Copied(File):
    """A file copied into the site as it is, whatever its extension."""

    def is_documentation_page(self) -> bool:
        return False

    def is_static_page(self) -> bool:
        return False

    def is_media_file(self) -> bool:
        return True


def on_files(files, config):
    root = os.path.dirname(config["config_file_path"])
    for folder, dirs, names in os.walk(os.path.join(root, RESULTS)):
        dirs[:] = sorted(d for d in dirs if not d.endswith("_runs"))  # the git-ignored run folders
        for name in sorted(names):
            path = os.path.relpath(os.path.join(folder, name), root)
            files.append(_Copied(path, root, config["site_dir"], config["use_directory_urls"],
                                 dest_uri=path.replace(os.sep, "/")))
    return files


def on_page_markdown(markdown, page, config, files):
    if "/" in page.file.src_uri:
        raise ValueError(f"{page.file.src_uri}: the results links assume pages at the top of docs/")
    return _LINK.sub("](benchmarks/results/", markdown)
