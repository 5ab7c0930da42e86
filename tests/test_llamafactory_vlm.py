"""Multimodal SFT of a tiny Qwen3-VL-MoE and a tiny ERNIE-4.5-VL through the real `llamafactory-cli` (subprocesses),
with images:

- `USE_KT=1 llamafactory-cli train` on an image + text dataset logs stock LLaMA-Factory's per-step losses (fp32
  experts on the engine, the vision tower and projector stock; Qwen3-VL-MoE's experts stored transposed as on the
  Hub; ERNIE-4.5-VL's text and vision experts in one per-expert list, each set an engine layer of its own);
- `train` with do_predict + predict_with_generate on images (greedy, batched with left padding) writes the
  generated_predictions.jsonl of stock LLaMA-Factory, with the adapter the stock run trained (Qwen3-VL-MoE).
The model directories are made here: tiny_models' configs on the demo tokenizer plus each family's image tokens, its
processor of 8x8 patches merged 2x2 (ERNIE: the PIL image processor), and PNG images of a few sizes drawn by the test.

ERNIE-4.5-VL in stock LLaMA-Factory 0.9.5 (template ernie_vl), which these runs share: its plugin passes no
moe_mm_token_type_ids (only the image processor's outputs), so every token, image tokens included, goes to the text
experts and the vision experts idle; and `lora_target: all` fails in stock PEFT (the resampler's linear is named
`mlp`, which then also names every decoder MLP), so the runs name the linears.
"""
import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from llamafactory_run import llamafactory_cli

pytestmark = pytest.mark.slow  # trains and predicts through the real CLI in subprocesses

REPO = Path(__file__).resolve().parents[1]
DEMO_MODEL = REPO / "examples" / "demo" / "model"
STEPS = 8
VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
IMAGE_SIZES = [(32, 32), (48, 32), (32, 64), (64, 48)]  # (width, height): grids of 4 .. 12 image tokens


# The CPU venv's torchvision is a stub (requirements/constraints-cpu.txt): transformers then resolves no video
# processor by name, and Qwen-VL processors (image + video processor) do not load, in stock LLaMA-Factory as in
# ours. Images need no torchvision: both runs get this sitecustomize, which registers the video processor class.
# transformers' top-level names of the video classes are placeholders that raise; processing_utils checks a video
# processor's class against its own reference to the top-level module, so the real classes are set there.
SITECUSTOMIZE = """
import importlib.util
if importlib.util.find_spec("torchvision") is None:
    from transformers import Qwen3VLMoeConfig, processing_utils
    from transformers.models.auto.video_processing_auto import AutoVideoProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor
    from transformers.video_processing_utils import BaseVideoProcessor
    top = processing_utils.transformers_module
    top.BaseVideoProcessor, top.Qwen3VLVideoProcessor = BaseVideoProcessor, Qwen3VLVideoProcessor
    AutoVideoProcessor.register(Qwen3VLMoeConfig, Qwen3VLVideoProcessor, exist_ok=True)
    # ERNIE-4.5-VL's video processor module imports torchvision: a stand-in of its name (images only here; `font`:
    # its processor's save_pretrained copies the font file named there, if it exists)
    from transformers import Ernie4_5_VLMoeConfig

    class Ernie4_5_VLMoeVideoProcessor(BaseVideoProcessor):
        font = ""

    top.Ernie4_5_VLMoeVideoProcessor = Ernie4_5_VLMoeVideoProcessor
    AutoVideoProcessor.register(Ernie4_5_VLMoeConfig, Ernie4_5_VLMoeVideoProcessor, exist_ok=True)
"""
# ERNIE-4.5-VL's image / video markers (the names its processor reads from the tokenizer) and ernie_vl's stop word.
ERNIE_TOKENS = {"image_token": "<|IMAGE_PLACEHOLDER|>", "image_start_token": "<|IMAGE_START|>",
                "image_end_token": "<|IMAGE_END|>", "video_token": "<|VIDEO_PLACEHOLDER|>",
                "video_start_token": "<|VIDEO_START|>", "video_end_token": "<|VIDEO_END|>"}
ERNIE_STOP = "<|end_of_sentence|>"
ERNIE_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


def _processor(tokenizer):
    exec(SITECUSTOMIZE, {})
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    grid = dict(patch_size=8, merge_size=2, temporal_patch_size=2)
    pixels = {"shortest_edge": 16 * 16, "longest_edge": 64 * 64}
    return Qwen3VLProcessor(image_processor=Qwen2VLImageProcessor(size=pixels, **grid), tokenizer=tokenizer,
                            video_processor=Qwen3VLVideoProcessor(size=pixels, **grid),
                            chat_template=tokenizer.chat_template)


def make_vl_model_dir(path: Path) -> Path:
    """tiny_models' qwen3_vl_moe on the demo tokenizer (+ the vision tokens), saved with its processor."""
    from transformers import AutoTokenizer

    from tiny_models import make_tiny_model, transpose_fused_experts

    tokenizer = AutoTokenizer.from_pretrained(DEMO_MODEL)
    tokenizer.add_special_tokens({"additional_special_tokens": VISION_TOKENS})
    ids = dict(zip(("vision_start_token_id", "vision_end_token_id", "image_token_id", "video_token_id"),
                   tokenizer.convert_tokens_to_ids(VISION_TOKENS)))
    text = dict(vocab_size=len(tokenizer), bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    from tiny_models import VL_KWARGS

    model = make_tiny_model("qwen3_vl_moe", text_config={**VL_KWARGS["qwen3_vl_moe"]["text_config"], **text}, **ids)
    model.save_pretrained(path, max_shard_size="200KB")
    transpose_fused_experts(path)
    _processor(tokenizer).save_pretrained(path)
    return path


def make_ernie_model_dir(path: Path) -> Path:
    """tiny_models' ernie4_5_vl_moe on the demo tokenizer (+ ERNIE's image / video markers and stop word), saved
    with an Ernie4_5_VLMoeProcessor of 8x8 patches merged 2x2."""
    from transformers import AutoTokenizer, processing_utils
    from transformers.models.ernie4_5_vl_moe.image_processing_pil_ernie4_5_vl_moe import \
        Ernie4_5_VLMoeImageProcessorPil
    from transformers.models.ernie4_5_vl_moe.processing_ernie4_5_vl_moe import Ernie4_5_VLMoeProcessor

    from tiny_models import VL_KWARGS, make_tiny_model

    exec(SITECUSTOMIZE, {})
    tokenizer = AutoTokenizer.from_pretrained(DEMO_MODEL, extra_special_tokens=ERNIE_TOKENS)
    tokenizer.add_special_tokens({"additional_special_tokens": [ERNIE_STOP]})
    ids = {f"{name}_id": tokenizer.convert_tokens_to_ids(token) for name, token in ERNIE_TOKENS.items()}
    text = dict(vocab_size=len(tokenizer), bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    model = make_tiny_model("ernie4_5_vl_moe", text_config={**VL_KWARGS["ernie4_5_vl_moe"]["text_config"], **text},
                            **ids)
    model.save_pretrained(path, max_shard_size="200KB")
    images = Ernie4_5_VLMoeImageProcessorPil(patch_size=8, merge_size=2,
                                             size={"shortest_edge": 16 * 16, "longest_edge": 64 * 64})
    video = processing_utils.transformers_module.Ernie4_5_VLMoeVideoProcessor()
    Ernie4_5_VLMoeProcessor(image_processor=images, tokenizer=tokenizer, video_processor=video,
                            chat_template=tokenizer.chat_template).save_pretrained(path)
    return path


def make_image_dataset(path: Path) -> Path:
    """12 train and 4 eval conversations, one image each (a colour and a bar pattern), answers naming them."""
    from PIL import Image

    path.mkdir(parents=True, exist_ok=True)
    colours = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 230), "grey": (128, 128, 128)}
    rows = []
    for i in range(16):
        name, rgb = list(colours.items())[i % 4]
        w, h = IMAGE_SIZES[i % len(IMAGE_SIZES)]
        image = Image.new("RGB", (w, h), rgb)
        for x in range(0, w, 4 + i % 3):
            image.paste((255 - rgb[0], 255 - rgb[1], 255 - rgb[2]), (x, 0, x + 1, h))
        file = path / f"img{i}.png"
        image.save(file)
        rows.append({"messages": [{"role": "user", "content": "<image>what colour is this picture?"},
                                  {"role": "assistant", "content": f"the picture is {name} with bars"}],
                     "images": [str(file)]})
    (path / "vl_train.json").write_text(json.dumps(rows[:12]))
    (path / "vl_eval.json").write_text(json.dumps(rows[12:]))
    columns = {"formatting": "sharegpt", "columns": {"messages": "messages", "images": "images"},
               "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}}
    (path / "dataset_info.json").write_text(json.dumps({"vl_train": {"file_name": "vl_train.json", **columns},
                                                        "vl_eval": {"file_name": "vl_eval.json", **columns}}))
    return path


def _cli(cfg: dict, tmp: Path, ours: bool) -> str:
    name = Path(cfg["output_dir"]).name
    (tmp / f"{name}.yaml").write_text(yaml.safe_dump({**cfg, **({"use_kt": True, "kt_backend": "FP32"} if ours
                                                                 else {})}))
    (tmp / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = {**os.environ, "USE_KT": "1" if ours else "0", "KT_SFT_THREADS": "2", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp), str(REPO), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run(llamafactory_cli("train", str(tmp / f"{name}.yaml")), env=env, capture_output=True,
                         text=True, timeout=900)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    return log


def _common(model: Path, data: Path, out: Path, template: str = "qwen3_vl_nothink") -> dict:
    return dict(model_name_or_path=str(model), stage="sft", finetuning_type="lora", dataset_dir=str(data),
                template=template, cutoff_len=128, output_dir=str(out), overwrite_output_dir=True,
                report_to="none", preprocessing_num_workers=1, overwrite_cache=True, image_max_pixels=64 * 64,
                image_min_pixels=16 * 16)


def _history(out: Path) -> dict:
    state = json.loads((out / "trainer_state.json").read_text())
    return {e["step"]: e for e in state["log_history"] if "loss" in e}


@pytest.fixture(scope="module")
def vl_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lf_vlm")
    model, data = make_vl_model_dir(tmp / "model"), make_image_dataset(tmp / "data")
    logs = {ours: _cli({**_common(model, data, tmp / ("kt" if ours else "stock")), **TRAIN}, tmp, ours)
            for ours in (True, False)}
    return tmp, model, data, logs


TRAIN = dict(do_train=True, dataset="vl_train", lora_target="all", lora_rank=8, lora_alpha=16,
             per_device_train_batch_size=4, learning_rate=2e-3, max_steps=STEPS, logging_steps=1, save_steps=STEPS,
             seed=42)


def test_multimodal_sft_matches_stock_llamafactory(vl_runs):
    tmp, _, _, logs = vl_runs
    assert "kt-sft: 2 MoE layers / 12 experts" in logs[True] and "on CPU engine" in logs[True]
    ours, stock = _history(tmp / "kt"), _history(tmp / "stock")
    assert sorted(ours) == sorted(stock) == list(range(1, STEPS + 1))
    for step in ours:  # losses are logged rounded to 4 decimals; grad norms are not
        assert ours[step]["loss"] == pytest.approx(stock[step]["loss"], rel=1e-4, abs=2e-4), step
        assert ours[step]["grad_norm"] == pytest.approx(stock[step]["grad_norm"], rel=1e-4), step
    assert ours[STEPS]["loss"] < ours[1]["loss"]
    targets = json.loads((tmp / "kt" / "adapter_config.json").read_text())["target_modules"]
    assert targets and all(".language_model." in t for t in targets)  # the vision tower stays frozen, as stock


def test_lora_target_can_name_the_routed_experts_of_a_vision_language_model(vl_runs):
    """`lora_target: all,experts`: LLaMA-Factory's full module names of the language model's linears (as for
    `all`) plus the routed experts as PEFT target_parameters, trained by the engine."""
    tmp, model, data, _ = vl_runs
    out = tmp / "experts"
    _cli({**_common(model, data, out), **TRAIN, "lora_target": "all,experts", "max_steps": 4, "save_steps": 4},
         tmp, True)
    config = json.loads((out / "adapter_config.json").read_text())
    assert sorted(config["target_parameters"]) == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
    assert config["target_modules"] and all(".language_model." in t for t in config["target_modules"])
    assert not any("experts" in t for t in config["target_modules"])
    from safetensors import safe_open

    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        expert_b = [f.get_tensor(k) for k in f.keys() if ".experts." in k and "lora_B" in k]
    assert expert_b and all(t.abs().max() > 0 for t in expert_b)


def test_generation_with_images_matches_stock_llamafactory(vl_runs):
    tmp, model, data, _ = vl_runs
    predictions = {}
    for ours in (True, False):
        out = tmp / f"predict_{'kt' if ours else 'stock'}"
        cfg = dict(_common(model, data, out), adapter_name_or_path=str(tmp / "stock"), do_predict=True,
                   eval_dataset="vl_eval", predict_with_generate=True, per_device_eval_batch_size=4,
                   do_sample=False, max_new_tokens=8)
        _cli(cfg, tmp, ours)
        predictions[ours] = [json.loads(line) for line in (out / "generated_predictions.jsonl").read_text().splitlines()]
    assert len(predictions[True]) == 4 and predictions[True] == predictions[False]
    assert any(p["predict"].strip() for p in predictions[True])


@pytest.fixture(scope="module")
def ernie_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lf_ernie")
    model, data = make_ernie_model_dir(tmp / "model"), make_image_dataset(tmp / "data")
    logs = {ours: _cli({**_common(model, data, tmp / ("kt" if ours else "stock"), "ernie_vl"), **TRAIN,
                        "lora_target": ERNIE_TARGETS}, tmp, ours)
            for ours in (True, False)}
    return tmp, logs


def test_ernie_vl_multimodal_sft_matches_stock_llamafactory(ernie_runs):
    """Both experts sets of each MoE layer on the engine (text and vision experts: 2 x 6 per layer)."""
    tmp, logs = ernie_runs
    assert "kt-sft: 2 MoE layers x 2 experts modules / 24 experts" in logs[True]
    ours, stock = _history(tmp / "kt"), _history(tmp / "stock")
    assert sorted(ours) == sorted(stock) == list(range(1, STEPS + 1))
    for step in ours:
        assert ours[step]["loss"] == pytest.approx(stock[step]["loss"], rel=1e-4, abs=2e-4), step
        assert ours[step]["grad_norm"] == pytest.approx(stock[step]["grad_norm"], rel=1e-4), step
    assert ours[STEPS]["loss"] < ours[1]["loss"]
