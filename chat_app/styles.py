"""The look: a calm theme on system fonts (nothing fetched from the network) and a little CSS."""
from __future__ import annotations

HEAD = '<meta name="color-scheme" content="light">'

SYSTEM_FONTS = ["ui-sans-serif", "system-ui", "-apple-system", "Segoe UI", "Roboto", "Helvetica Neue", "Arial", "sans-serif"]
MONO_FONTS = ["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "monospace"]


def theme():
    import gradio as gr

    return gr.themes.Soft(primary_hue="teal", secondary_hue="slate", neutral_hue="slate", radius_size="lg",
                          font=SYSTEM_FONTS, font_mono=MONO_FONTS).set(
        body_background_fill="#f6f8fa",
        block_border_width="1px",
        block_shadow="none",
        button_primary_shadow="none",
    )


CSS = """
.gradio-container { max-width: 1440px !important; margin: 0 auto !important; }
footer { display: none !important; }

#heed-header { align-items: center; padding: 4px 4px 0; gap: 12px; flex-wrap: nowrap; }
#heed-header > div:first-child { flex: 1 1 auto; }
.heed-brand { font-size: 1.45rem; font-weight: 700; letter-spacing: -0.01em; color: #0f172a; white-space: nowrap; }
.heed-logo { color: var(--color-accent); margin-right: 4px; }
.heed-tagline { font-size: 0.85rem; font-weight: 400; color: #64748b; margin-left: 12px; }
#heed-user { flex: 0 1 auto !important; text-align: right; color: #475569; white-space: nowrap; }
#heed-user p { margin: 0; }
#heed-user { overflow: hidden; text-overflow: ellipsis; }
#heed-logout { flex: 0 0 auto !important; }

#heed-sidebar { gap: 10px; }
#heed-convs .wrap { flex-direction: column; gap: 2px; max-height: 56vh; overflow-y: auto; flex-wrap: nowrap; }
#heed-convs label { width: 100%; margin: 0; border: none; background: transparent; box-shadow: none;
  border-radius: 8px; padding: 8px 10px; cursor: pointer; }
#heed-convs label span { overflow: hidden; text-overflow: ellipsis; white-space: nowrap; display: block; }
#heed-convs label:hover { background: #eef2f6; }
#heed-convs label.selected { background: var(--color-accent-soft); color: #0f3d3a; font-weight: 600; }
#heed-convs input[type=radio] { display: none; }

#heed-notice { background: #ecfdf5; border: 1px solid #a7f3d0; border-radius: 10px; padding: 8px 14px; }
#heed-notice p { margin: 0; }
#heed-chat { border-radius: 14px; }
#heed-chat .placeholder-content { display: flex; align-items: center; justify-content: center; height: 100%; }
#heed-chat .placeholder { color: #475569; text-align: center; max-width: 520px; margin: 0 auto; padding: 0 16px; }
#heed-chat .placeholder h3 { font-size: 1.5rem; margin-bottom: 0.4em; }
#heed-input { align-items: flex-end; gap: 8px; flex-wrap: nowrap !important; }
#heed-input > * { min-width: 0 !important; }
#heed-input button { flex: 0 0 auto !important; min-width: 76px !important; }
#heed-msg textarea { font-size: 1rem; }
#heed-compare { border: 1px solid var(--color-accent); border-radius: 12px; }
.heed-alt { background: #fff; border-radius: 10px; padding: 6px 10px; }

.heed-card { border-radius: 12px; margin-bottom: 12px; }
#heed-focus p { color: #334155; }
#heed-rate { align-items: center; gap: 4px 10px; flex-wrap: wrap !important; padding: 0 4px; }
#heed-rate > .block:has(.heed-rate-label) { flex: 0 0 auto !important; width: auto !important; min-width: max-content !important; }
.heed-rate-label { color: #475569; font-size: 0.9rem; white-space: nowrap; }
#heed-stars { flex: 0 1 auto !important; min-width: 0 !important; width: auto !important; padding: 0 !important; background: transparent !important; border: none !important; }
#heed-stars .wrap { gap: 4px; flex-wrap: wrap; }
#heed-stars label { padding: 2px 10px; color: #d97706; border-radius: 999px; }
#heed-stars label.selected { background: #fef3c7; color: #b45309; font-weight: 600; }
#heed-stars input[type=radio] { display: none; }
#heed-chat textarea.edit-textarea { min-width: min(560px, 62vw); min-height: 120px; }

.heed-note { align-items: center; padding: 4px 10px; gap: 8px; flex-wrap: nowrap !important; }
.heed-note > * { min-width: 0 !important; }
.heed-note button { flex: 0 0 auto !important; }
#heed-learned .heed-card { padding-bottom: 8px; }
#heed-learn, #heed-learn-status { margin: 0 10px; width: calc(100% - 20px); }
#heed-learn-status:empty { display: none; }
.heed-empty p { color: #64748b; }
.heed-progress { padding: 10px 12px; border-radius: 10px; background: #f1f5f9; font-size: 0.95rem; }
.heed-bar { height: 8px; border-radius: 4px; background: #e2e8f0; margin-top: 8px; overflow: hidden; }
.heed-bar > div { height: 100%; background: var(--color-accent); transition: width 0.4s ease; }

@media (max-width: 820px) {
  .heed-tagline, .heed-signed { display: none; }
  #heed-main { flex-direction: column; }
  #heed-main > .column { flex: 0 0 auto !important; width: 100% !important; }
  #heed-center { order: 1; }
  #heed-tools { order: 2; }
  #heed-sidebar { order: 3; }
  #heed-convs .wrap { max-height: 22vh; }
  #heed-chat { height: 60vh !important; }
}
"""
