"""Export a model trained here to formats other tools load: Hugging Face folders and MiniGPT-4's projector file.

    python -m minigpt4.export --cfg-path eval_configs/adavib_minigpt4_7b.yaml --options model.encoder_path=... \
        model.llm_path=... --ckpt out/adavib_minigpt4_7b/final/trainable.safetensors --out export/adavib-7b
    python -m minigpt4.export --check export/adavib-7b        # reload with transformers' classes and report

At inference AdaVIB's visual tokens are the mean head μ, so the trained model is a standard model of its family
and the export only writes that model out:

* `model.arch: llava15` -> a llava-hf folder (`LlavaForConditionalGeneration`, μ head = `multi_modal_projector`,
  processor with the image settings and the chat template), as lmms-eval's `llava_hf`, VLMEvalKit and vLLM read it;
* `model.arch: minigpt4` -> (a) `minigpt4_projector.pth`, `{"model": {"llama_proj.weight", "llama_proj.bias"}}`
  as the original MiniGPT-4 code loads it, and (b) a `Blip2ForConditionalGeneration` folder with the Vicuna as
  its language model and μ as `language_projection` (what differs from this project's model is listed in
  `blip2_hf.DIFFERENCES` and in the export's model card).

Every export also writes a model card (README.md), `adavib_export.json` (sources with SHA-256, differences, the
prompt-token check) and, for a VIB projector, the σ head and prior in `adavib_vib_head.safetensors`, from which
`--to-trainable` rebuilds this project's `trainable.safetensors` to continue training.
"""
