"""The Gradio demo's building blocks: model loading, per-image diagnostics, object-word highlighting, the chat
logic (plain Python, testable without a browser) and the Gradio page that wraps it. `demo.py` composes them."""
