"""The HTML pages fruitlens writes come from Jinja2 templates in ``fruitlens/templates`` (package data), with
autoescaping on: a class named ``Kiwi<img src=x onerror=alert(1)>`` is text on every page."""

from __future__ import annotations

from functools import lru_cache
from typing import Any


@lru_cache(maxsize=1)
def _environment():
    from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

    env = Environment(
        loader=PackageLoader("fruitlens", "templates"),
        autoescape=select_autoescape(default=True),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["pct"] = lambda v, digits=1: "-" if v is None or v != v else f"{100 * v:.{digits}f}%"
    env.filters["cell"] = lambda v: str(v).replace("|", "\\|")  # a Markdown table cell
    return env


def render(template: str, **context: Any) -> str:
    """The template ``template`` (a file name in ``fruitlens/templates``) filled with ``context``."""
    return _environment().get_template(template).render(**context)
