"""Text going into and coming out of the chat widget.

Messages are shown as Markdown, but any HTML in them (from the user or the
model) must show as inert text, not run. Outside code spans and fences every
``<`` becomes ``&lt;``: the Markdown renderer then prints it literally and no
tag can start. Inside code the text is left alone (Markdown already shows code
verbatim, and an entity there would print as ``&lt;``). The widget's own
sanitizer stays on as a second layer.

The edit box shows the displayed text, so an edit comes back escaped;
``from_display`` undoes exactly what ``to_display`` did.
"""
from __future__ import annotations

import re

# Fenced blocks (``` or ~~~, up to the matching fence or the end) and inline code spans.
_CODE = re.compile(r"(^[ \t]*(`{3,}|~{3,})[^\n]*\n.*?(?:^[ \t]*\2[ \t]*$|\Z)|(`+)(?!`).+?(?<!`)\3(?!`))", re.S | re.M)


def _outside_code(text: str, fn) -> str:
    out, last = [], 0
    for m in _CODE.finditer(text):
        out.append(fn(text[last:m.start()]))
        out.append(m.group(0))
        last = m.end()
    out.append(fn(text[last:]))
    return "".join(out)


def to_display(text: str) -> str:
    """Markdown that renders ``text`` with any HTML shown as text."""
    return _outside_code(text, lambda s: s.replace("<", "&lt;"))


def from_display(text: str) -> str:
    """The stored text for something the widget sends back (an edit)."""
    return _outside_code(text, lambda s: s.replace("&lt;", "<"))


def text_of(content: object) -> str | None:
    """Plain text from a chat message's content as Gradio 6 sends it.

    Gradio 6 sends a list of parts (``[{"type": "text", "text": ...}]``); older
    shapes (a bare string, one part dict, ``{"value": ...}``) are accepted too.
    Anything else (files, numbers, nested junk from a raw API call) gives None.
    """
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        if content.get("type", "text") == "text" and isinstance(content.get("text"), str):
            return content["text"]
        if isinstance(content.get("value"), str):
            return content["value"]
        return None
    if isinstance(content, (list, tuple)) and content:
        parts = [text_of(p) for p in content]
        if any(p is None for p in parts):
            return None
        return "\n".join(parts)
    return None
