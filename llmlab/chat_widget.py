"""A chat box for JupyterLab: a text input, the conversation streamed into an HTML
widget, and Send / Reset buttons, around a :class:`~llmlab.chat.ChatSession`::

    from llmlab.chat_widget import ChatBox
    box = ChatBox(session)
    box.widget          # display it (the last expression of a cell)
    box.send("Hi!")     # what pressing Enter does; also usable from code

Replies stream: the HTML widget is updated as pieces arrive, which JupyterLab shows live.
"""

from __future__ import annotations

import html

import ipywidgets as widgets

from llmlab.backends.base import BackendError
from llmlab.chat import ChatError, ChatSession

STYLE = (
    "<style>.llmlab-chat{font-family:sans-serif;max-height:24em;overflow-y:auto}"
    ".llmlab-chat .you{color:#1b5e20;margin:.3em 0}.llmlab-chat .bot{color:#0d47a1;"
    "margin:.3em 0 .8em 0;white-space:pre-wrap}.llmlab-chat .note{color:#8d6e63;font-size:90%}</style>"
)


class ChatBox:
    """The widgets and their handlers; ``widget`` is the box to display."""

    def __init__(
        self, session: ChatSession, placeholder: str = "Ask something and press Enter"
    ) -> None:
        self.session = session
        self.text = widgets.Text(
            placeholder=placeholder, continuous_update=False, layout={"width": "70%"}
        )
        self.send_button = widgets.Button(description="Send", button_style="primary")
        self.reset_button = widgets.Button(description="Reset", tooltip="Forget the conversation")
        self.log = widgets.HTML()
        self.status = widgets.HTML()
        self.text.observe(self._on_enter, names="value")
        self.send_button.on_click(lambda _: self._send_typed())
        self.reset_button.on_click(lambda _: self.reset())
        self.widget = widgets.VBox(
            [self.log, widgets.HBox([self.text, self.send_button, self.reset_button]), self.status]
        )
        self._render()

    def _on_enter(self, change: dict) -> None:
        # continuous_update=False: the value changes when Enter is pressed (or focus leaves).
        if change["new"].strip():
            self._send_typed()

    def _send_typed(self) -> None:
        text = self.text.value
        with self.text.hold_trait_notifications():
            self.text.unobserve(self._on_enter, names="value")
            self.text.value = ""
            self.text.observe(self._on_enter, names="value")
        if text.strip():
            self.send(text)

    def send(self, text: str) -> str:
        """Ask ``text``, streaming the reply into the box; return the reply text."""
        self.text.disabled = self.send_button.disabled = True
        try:
            chunks = self.session.stream(text)
            note = ""
            if self.session.last_dropped:
                note = f"dropped {len(self.session.last_dropped)} old messages to fit the context"
            partial = ""
            for chunk in chunks:
                partial += chunk.text
                self._render(pending=partial, note=note)
        except (ChatError, BackendError) as exc:
            self.status.value = f"<span style='color:#b71c1c'>{html.escape(str(exc))}</span>"
            return ""
        finally:
            self.text.disabled = self.send_button.disabled = False
        result = self.session.last_result
        self._render(note=note)
        self.status.value = (
            f"<small>{result.usage.completion_tokens} tokens, {result.timings.tokens_per_second:.1f} tok/s, "
            f"first token after {result.timings.time_to_first_token * 1000:.0f} ms</small>"
        )
        return result.text

    def reset(self) -> None:
        """Clear the conversation and the box."""
        self.session.reset()
        self.status.value = ""
        self._render()

    def _render(self, pending: str | None = None, note: str = "") -> None:
        rows = []
        for m in self.session.messages:
            label, css = ("you", "you") if m["role"] == "user" else ("model", "bot")
            mark = " <span class='note'>(interrupted)</span>" if m.get("interrupted") else ""
            rows.append(
                f"<div class='{css}'><b>{label}:</b> {html.escape(m['content'])}{mark}</div>"
            )
        if pending is not None:
            rows.append(f"<div class='bot'><b>model:</b> {html.escape(pending)}▌</div>")
        if note:
            rows.insert(0, f"<div class='note'>[{html.escape(note)}]</div>")
        self.log.value = STYLE + "<div class='llmlab-chat'>" + "".join(rows) + "</div>"
