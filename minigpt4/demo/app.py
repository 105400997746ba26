"""The Gradio page around `DemoEngine`: image upload, diagnostics, a streamed multi-turn chat, compare mode.

The handlers here only translate between Gradio components and the engine: every user mistake the engine
reports (`DemoInputError`) becomes a gr.Warning toast plus the status line, and an unexpected failure is
logged with its traceback on the server while the page shows one line. Generation is serialised by the
queue (one answer at a time), which is also what makes sharing one model between sessions safe.
"""
from __future__ import annotations

import logging
import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402

from minigpt4.demo.chat import BASE, COMPARE, ChatState, DecodingSettings, DemoEngine, DemoInputError  # noqa: E402

log = logging.getLogger(__name__)

INTRO = """# MiniGPT-4 + AdaVIB: hallucination diagnostics
Upload an image, then chat about it. For each image the panel on the left shows how concentrated the pooled
visual tokens are on the LLM's vocabulary: **H/log V** is the normalised entropy of softmax(u·Eᵀ) (1 = spread
over the whole vocabulary, near 0 = sitting on a few words), **α = −log(H/log V)** is the weight AdaVIB gives
that image's KL term, and the table lists the nearest vocabulary entries. Object words that CHAIR counts are
<mark style="background:#fde68a">highlighted</mark>; in compare mode, objects named by only one of the two
answers are <mark style="background:#fca5a5">marked stronger</mark>."""

CSS = """
mark.chair-obj { background: #fde68a; color: #111; border-radius: 3px; padding: 0 2px; }
mark.chair-only { background: #fca5a5; font-weight: 600; }
#status { min-height: 1.5em; }
"""


def _warn(message: str) -> str:
    gr.Warning(message)
    return f"⚠️ {message}"


def handle_upload(engine: DemoEngine, path: str | None, state: ChatState):
    """-> state, file box, preview image, diagnostics Markdown, similarity plot, base chat, compare chat, status.
    A refused file is also cleared from the file box, so the next one can be dropped straight away."""
    try:
        state, preview, diagnostics = engine.upload(state, path)
        figure = engine.similarity_figure(state)
    except DemoInputError as err:
        return engine.new_state(), None, None, "", None, [], [], _warn(str(err))
    except Exception as err:  # noqa: BLE001 - keep the page alive; the server log has the traceback
        log.exception("image upload failed")
        return (engine.new_state(), None, None, "", None, [], [],
                _warn(f"Could not process the image ({type(err).__name__}). Please try another file."))
    return state, gr.update(), preview, diagnostics, figure, [], [], f"Loaded {state.image_name}. Ask a question."


def handle_example(engine: DemoEngine, examples: list[str], state: ChatState, evt: gr.SelectData):
    """A click on an example image loads it exactly as an upload of that file would (the file box is emptied)."""
    result = list(handle_upload(engine, examples[evt.index], state))
    result[1] = None
    return tuple(result)


def handle_send(engine: DemoEngine, question: str, state: ChatState, num_beams: float, do_sample: bool,
                temperature: float, top_p: float, max_new_tokens: float, compare: bool):
    """Generator -> (state, base chat, compare chat, status, question box) as the answer streams."""
    settings = DecodingSettings(max_new_tokens=int(max_new_tokens), num_beams=int(num_beams),
                                do_sample=bool(do_sample), temperature=float(temperature), top_p=float(top_p))
    keep = gr.update()
    try:
        first = True
        for update in engine.answer(state, question, settings, compare=bool(compare) and engine.has_compare):
            # Clear the question box with the first update, so the next question can be typed while streaming.
            yield (update.state, update.messages.get(BASE, []), update.messages.get(COMPARE, []), update.status,
                   "" if first else keep)
            first = False
    except DemoInputError as err:
        yield state, keep, keep, _warn(str(err)), keep
    except Exception as err:  # noqa: BLE001
        log.exception("generation failed")
        messages = engine.messages(state)
        yield (state, messages.get(BASE, []), messages.get(COMPARE, []),
               _warn(f"Generation failed ({type(err).__name__}: {err}). Try other settings."), keep)


def handle_clear(engine: DemoEngine, state: ChatState):
    """Forget the conversation, keep the image (and its diagnostics)."""
    if state.features is not None:
        for conv in state.conversations.values():
            conv.turns.clear()
    return state, [], [], "Chat cleared." if state.features is not None else ""


def build_demo(engine: DemoEngine, *, model_description: str, compare_description: str | None = None,
               defaults: DecodingSettings | None = None, examples: list[str] | None = None) -> gr.Blocks:
    """The page; `examples` are image files shown as clickable thumbnails under the upload box."""
    defaults = defaults or DecodingSettings()
    examples = list(examples or [])
    with gr.Blocks(title="MiniGPT-4 AdaVIB demo", analytics_enabled=False) as demo:
        state = gr.State(engine.new_state())
        gr.Markdown(INTRO)
        info = f"**Model:** {model_description}"
        if compare_description:
            info += f"  \n**Compare projector:** {compare_description}"
        gr.Markdown(info, elem_id="model-info")
        with gr.Row():
            with gr.Column(scale=1, min_width=300):
                upload = gr.File(label="Image file", type="filepath", elem_id="image-upload")
                gallery = gr.Gallery(value=examples, label="Examples: click one to load it", columns=2,
                                     rows=2, height=420, object_fit="contain", allow_preview=False, interactive=False,
                                     visible=bool(examples), elem_id="examples")
                preview = gr.Image(label="Image", type="pil", interactive=False, height=360, elem_id="preview")
            with gr.Column(scale=2):
                with gr.Row():
                    chat_base = gr.Chatbot(label="Base projector", height=420, elem_id="chat-base")
                    chat_compare = gr.Chatbot(label="Compare projector", height=420, elem_id="chat-compare",
                                              visible=engine.has_compare)
                with gr.Row():
                    question = gr.Textbox(label="Question", placeholder="Describe this image.", scale=4,
                                          elem_id="question")
                    send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
                    clear = gr.Button("Clear chat", scale=1, elem_id="clear")
                status = gr.Markdown(elem_id="status")
                compare = gr.Checkbox(label="Compare mode: the second projector answers the same question",
                                      value=engine.has_compare, visible=engine.has_compare, elem_id="compare")
                with gr.Accordion("Decoding", open=False):
                    num_beams = gr.Slider(1, 5, value=defaults.num_beams, step=1,
                                          label="Beams (1 = greedy/sampling, streamed; >1 = beam search, not streamed)")
                    do_sample = gr.Checkbox(value=defaults.do_sample, label="Sample (otherwise greedy)")
                    temperature = gr.Slider(0.05, 2.0, value=defaults.temperature, step=0.05, label="Temperature")
                    top_p = gr.Slider(0.05, 1.0, value=defaults.top_p, step=0.05, label="Top-p")
                    max_new_tokens = gr.Slider(1, 512, value=defaults.max_new_tokens, step=1, label="Max new tokens")
        with gr.Row():  # the table and the same numbers as bars, side by side
            diagnostics = gr.Markdown(elem_id="diagnostics")
            plot = gr.Plot(show_label=False, elem_id="similarity-plot")  # the figure carries its own title

        # Every event that runs the model shares one queue slot (concurrency_id): Gradio's default limit is per
        # event, so without it an upload could encode while another session's answer is generating.
        model_slot = dict(concurrency_id="model", concurrency_limit=1)
        loaded = [state, upload, preview, diagnostics, plot, chat_base, chat_compare, status]
        upload.upload(lambda p, s: handle_upload(engine, p, s), [upload, state], loaded, **model_slot)
        upload.clear(lambda: (engine.new_state(), None, "", None, [], [], ""), None,
                     [state, preview, diagnostics, plot, chat_base, chat_compare, status])

        def example_fn(current: ChatState, evt: gr.SelectData):  # the annotation makes Gradio pass the click
            return handle_example(engine, examples, current, evt)

        gallery.select(example_fn, [state], loaded, **model_slot)
        inputs = [question, state, num_beams, do_sample, temperature, top_p, max_new_tokens, compare]
        outputs = [state, chat_base, chat_compare, status, question]

        def send_fn(*args):
            yield from handle_send(engine, *args)

        send.click(send_fn, inputs, outputs, **model_slot)
        question.submit(send_fn, inputs, outputs, **model_slot)
        clear.click(lambda s: handle_clear(engine, s), [state], [state, chat_base, chat_compare, status])
    # One generation at a time: the model is shared by every session and CPU/GPU time is the bottleneck.
    demo.queue(default_concurrency_limit=1)
    return demo


def launch_options() -> dict:
    """Theme and CSS for Blocks.launch. System fonts only: the page must not fetch fonts from the internet."""
    theme = gr.themes.Soft(font=["ui-sans-serif", "system-ui", "sans-serif"],
                           font_mono=["ui-monospace", "monospace"])
    return dict(theme=theme, css=CSS)
