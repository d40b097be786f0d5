"""Jinja2 rendering for the report: every value a template prints is HTML-escaped.

Site names come from folder names, note reasons from exceptions and manifests, data-card
values from DICOM headers: any of them may hold markup, and the report is opened on
hospital workstations. So the environment escapes every interpolation (autoescape), a
template can only print what it is given, and a name it is not given is an error
(StrictUndefined) rather than an empty cell. Sections are rendered separately, each from
its own template, and reach the page template as already-escaped Markup.
"""

from __future__ import annotations

from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from markupsafe import Markup

_ENV = Environment(
    loader=PackageLoader("fedir.server.report", "templates"),
    autoescape=select_autoescape(["html"], default=True),
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
    keep_trailing_newline=False,
)


def render(template: str, **context: Any) -> Markup:
    """`template` (a file in templates/) rendered with `context`, as safe markup."""
    return Markup(_ENV.get_template(template).render(**context))
