"""Turning store rows into what the widgets show. Pure functions: no Gradio, no store."""
from __future__ import annotations

import html
import time

from .sanitize import to_display

REASONS = ["wrong", "too long", "too short", "off-topic", "unsafe", "style"]
REASON_LABELS = {"wrong": "Wrong", "too long": "Too long", "too short": "Too short", "off-topic": "Off-topic",
                 "unsafe": "Unsafe", "style": "Style"}
CHAT_HEIGHT = "calc(100vh - 300px)"
CHAT_HEIGHT_COMPARING = "calc(100vh - 520px)"
STARS = [("★", 1), ("★★", 2), ("★★★", 3), ("★★★★", 4), ("★★★★★", 5)]

EMPTY_CHAT = (
    "### What can I help with?\n"
    "Ask anything. Then tell Heed what you think: like or dislike an answer, edit it, "
    "or say what to change (\"shorter\", \"no jargon\"). Heed learns your preferences."
)


def when(ts: float | None, *, now: float | None = None) -> str:
    if not ts:
        return "never"
    now = now or time.time()
    ago = now - ts
    if ago < 60:
        return "just now"
    if ago < 3600:
        return f"{int(ago // 60)} min ago"
    if ago < 86_400:
        return f"{int(ago // 3600)} h ago"
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts))


def chat_messages(history: list[dict]) -> list[dict]:
    """The widget's messages, one per active message, in order (index i is history[i])."""
    return [{"role": m["role"], "content": to_display(m["content"])} for m in history]


def feedback_values(history: list[dict], thumbs: dict[int, bool]) -> list[str | None]:
    """The Like/Dislike shown on each answer, in order of the answers."""
    out = []
    for m in history:
        if m["role"] == "assistant":
            up = thumbs.get(m["id"])
            out.append(None if up is None else ("Like" if up else "Dislike"))
    return out


def conversation_choices(convs: list[dict]) -> list[tuple[str, int]]:
    return [((c["title"] or "New conversation")[:60], c["id"]) for c in convs]


def focus_markdown(msg: dict | None, *, number: int | None, thumb: dict | None, edits: int = 0) -> str:
    if msg is None:
        return "Select an answer (click it, or vote on it) to give detailed feedback."
    bits = [f"**Answer {number}**" if number else "**This answer**"]
    if thumb is not None:
        bits.append("you liked it" if thumb["payload"]["up"] else "you disliked it")
    if msg.get("instruction"):
        bits.append(f"corrected: “{html.escape(msg['instruction'][:80])}”")
    if msg.get("original_content") is not None or edits:
        bits.append("edited by you")
    return " · ".join(bits)


def chat_label(conversation: dict | None, active_version: int | None) -> str:
    if conversation is not None:
        v = conversation["adapter_version"]
    else:
        v = active_version
    return f"Heed · personalized (v{v})" if v else "Heed · base model"


def news_markdown(active: dict) -> str:
    return (f"**Heed has learned from your feedback.** This conversation uses your adapter "
            f"**v{active['version']}**, trained {when(active['created_at'])} from {active['n_feedback']} feedback events.")


_GATE = [
    ("degenerate_candidate", "Broken answers (new)", "{:.0%}"),
    ("degenerate_active", "Broken answers (before)", "{:.0%}"),
    ("kl_from_base", "Drift from base (KL)", "{:.3f}"),
    ("heldout_logp_gain", "Held-out preference gain", "{:+.3f}"),
    ("heldout_n", "Held-out examples", "{}"),
    ("implicit_reward_accuracy", "Reward accuracy", "{:.0%}"),
]


def gate_lines(metrics: dict | None) -> list[str]:
    gate = (metrics or {}).get("gate") or {}
    lines = []
    for key, label, fmt in _GATE:
        value = gate.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            lines.append(f"| {label} | {fmt.format(value)} |")
    return lines


def adapter_markdown(status: dict) -> str:
    active = status.get("active")
    pending = status.get("unconsumed_feedback", 0)
    waiting = f"{_n(pending, 'feedback event')} not learned from yet."
    if not active:
        return f"**No adapter yet.** Heed answers you with the base model.\n\n{waiting}"
    m = active.get("metrics") or {}
    detail = ""
    if "n_train_new" in m:
        again = f", {m['n_carried']} retried after a refused run" if m.get("n_carried") else ""
        detail = f" ({_n(m['n_train_new'], 'new training example')}{again}, {_n(m.get('n_replay', 0), 'replayed')})"
    return (f"**In use: v{active['version']}**, trained {when(active['created_at'])} "
            f"from {_n(active['n_feedback'], 'feedback event')}{detail}.\n\n{waiting}")


def _n(k: int, what: str) -> str:
    plural = what if what.endswith("ed") or k == 1 else what + "s"
    return f"{k} {plural}"


def gate_markdown(status: dict) -> str:
    """The quality check the learner ran before putting the active version in service."""
    active = status.get("active")
    lines = gate_lines(active.get("metrics") if active else None)
    if not lines:
        return "No quality-check figures for this version." if active else "No version yet."
    return "\n".join(["| Check | Figure |", "|---|---|", *lines])


def version_rows(status: dict) -> list[list]:
    rows = []
    for a in status.get("versions", []):
        gate = (a.get("metrics") or {}).get("gate") or {}
        why = "; ".join(gate.get("reasons") or []) if a["status"] == "rejected" else ""
        rows.append([f"v{a['version']}", a["status"], when(a["created_at"]), a["n_feedback"], why])
    return rows


def rollback_choices(status: dict) -> list[tuple[str, int]]:
    """Versions one can switch to (0 stands for the base model)."""
    out = [(f"v{a['version']} ({a['status']}, {when(a['created_at'])})", a["version"])
           for a in status.get("versions", []) if a["status"] in ("active", "retired")]
    return out + [("Base model (no adapter)", 0)]


_RESULT = {
    "promoted": "Learned: a new version is in use from your next conversation.",
    "rejected": "A new version was trained but did not pass the quality check; your current one stays.",
    "skipped": "Nothing new to learn from yet.",
    "busy": "Another learning run for you is going.",
    "failed": "The learning run failed.",
}


def progress_html(p: dict | None) -> str:
    if not p or (not p.get("running") and not p.get("status")):
        return ""
    if p.get("running"):
        frac = p.get("fraction")
        pct = int(round((frac or 0) * 100))
        stage = html.escape(str(p.get("stage") or "working"))
        bar = (f'<div class="heed-bar"><div style="width:{max(pct, 3)}%"></div></div>' if frac is not None else "")
        return f'<div class="heed-progress"><b>Learning…</b> {stage} {pct if frac is not None else ""}{"%" if frac is not None else ""}{bar}</div>'
    status = p.get("status") or "finished"
    head = _RESULT.get(status, f"Finished: {html.escape(status)}")
    detail = html.escape(p.get("summary") or "")
    return f'<div class="heed-progress"><b>{head}</b><br><small>{detail}</small></div>'


TRIGGERS = {"cli": "you", "manual": "you", "schedule": "schedule"}


def runs_rows(runs: list[dict]) -> list[list]:
    out = []
    for r in runs:
        secs = f"{r['seconds']:.0f} s" if r.get("seconds") else ""
        version = f"v{r['candidate_version']}" if r.get("candidate_version") else ""
        out.append([when(r["started_at"]), TRIGGERS.get(r["trigger"], r["trigger"]), r["status"], version, r["n_feedback"], secs, (r.get("error") or "")[:120]])
    return out
