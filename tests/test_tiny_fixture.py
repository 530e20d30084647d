"""The tiny LLaVA-1.5 fixture: deterministic, in both formats, loadable by the real loaders.

The golden digests below were produced on torch 2.1.2 / transformers 4.37.2 / numpy 1.26 and
torch 2.15 / transformers 5.24 / numpy 2.4 and agree; a change means every golden output in the
matrix changes too, so bump ``FIXTURE_VERSION`` and regenerate them deliberately.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from packaging.version import Version

from dymu.api import format_prompt
from dymu.testing import shapes, tiny
from dymu.testing.sample_images import KINDS, make_sample_images, sample_image_array, write_sample_images

PROMPT = "USER: <image>\nWhat is in the picture? ASSISTANT:"

GOLDEN_WEIGHTS_SHA256 = "d2c86a42b1cb23ebc26df9bb148f977650292a4ded68ba6e6a035bc35ef91bfd"
GOLDEN_IMAGES_SHA256 = "b4c036a23b702d34954b3f93ac2f2ba92d1a2df48e062d22c97da81b66949560"
# llava-hf: "<image>" is one token (512); nothing is inserted after it ("legacy": false).
GOLDEN_HF_PROMPT_IDS = [1, 307, 483, 456, 512, 13, 491, 328, 270, 292, 263, 435, 485, 309, 483]
# Legacy llava tokenizes the text around "<image>" separately (tokenizer_image_token), so the
# second chunk gets its own BOS (dropped by llava) and dummy-prefix "▁" (456, kept by llava).
GOLDEN_LEGACY_CHUNK_IDS = ([1, 307, 483, 456], [1, 456, 13, 491, 328, 270, 292, 263, 435, 485, 309, 483])


def _tf_version() -> Version:
    import transformers

    return Version(transformers.__version__)


def _torch_version() -> Version:
    return Version(torch.__version__.split("+")[0])


def _bin_refused() -> bool:
    """transformers >= 4.52 refuses torch.load of .bin files on torch < 2.6 (CVE-2025-32434)."""
    return _tf_version() >= Version("4.52") and _torch_version() < Version("2.6")


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype == torch.float32, k
        assert torch.equal(got[k], want[k]), k


def _hf_checkpoint_key(model_key: str) -> str:
    """Map a LlavaForConditionalGeneration parameter name (any version) to the hub checkpoint key."""
    rules = (
        ("model.language_model.", "language_model.model."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
        ("model.vision_tower.vision_model.", "vision_tower.vision_model."),
        ("model.vision_tower.", "vision_tower.vision_model."),  # transformers 5: no vision_model level
        ("lm_head.", "language_model.lm_head."),
    )
    for old, new in rules:
        if model_key.startswith(old):
            return new + model_key[len(old) :]
    return model_key


# --------------------------------------------------------------------------------------------------
# Determinism


RANDOM = tiny.TinySpec(weights="random")


def test_random_weights_match_golden_digest() -> None:
    """The seeded draw is bit-identical on every stack (it is also where the training starts)."""
    weights = tiny.tiny_weights(RANDOM)
    assert list(weights) == [p.name for p in tiny.parameter_inits()] == sorted(weights)
    assert all(w.dtype == np.float32 for w in weights.values())
    state = tiny.legacy_state_dict(RANDOM) | tiny.clip_state_dict(RANDOM)
    assert tiny.tensors_sha256(state) == GOLDEN_WEIGHTS_SHA256


def test_trained_weights_are_the_committed_file() -> None:
    weights = tiny.tiny_weights()
    assert list(weights) == [p.name for p in tiny.parameter_inits()]
    assert all(w.dtype == np.float32 and np.isfinite(w).all() for w in weights.values())
    state = tiny.legacy_state_dict() | tiny.clip_state_dict()
    assert tiny.tensors_sha256(state) != GOLDEN_WEIGHTS_SHA256


@pytest.mark.parametrize("spec", [RANDOM, tiny.TinySpec()], ids=["random", "trained"])
def test_weights_are_not_defaults(spec: tiny.TinySpec) -> None:
    """Norms and biases are perturbed so that a tensor that fails to load cannot go unnoticed."""
    w = tiny.tiny_weights(spec)
    for name, arr in w.items():
        assert not np.all(arr == 0), name
        assert not np.all(arr == 1), name
    if spec is RANDOM:
        assert w["model.norm.weight"].mean() == pytest.approx(1.0, abs=0.1)


def test_two_builds_are_identical(tiny_checkpoints: dict[str, Path], tmp_path: Path) -> None:
    first = tiny_checkpoints[tiny.CLIP_DIR].parent
    tiny.build_tiny_checkpoints(tmp_path, RANDOM, vision_tower_path=tiny_checkpoints[tiny.CLIP_DIR])
    assert tiny.tree_fingerprint(first) == tiny.tree_fingerprint(tmp_path)
    for name in tiny.ALL_DIRS:
        for f in sorted((first / name).iterdir()):
            other = tmp_path / name / f.name
            if f.suffix == ".bin":
                _assert_same_tensors(_load_bin(other), _load_bin(f))
            else:
                assert f.read_bytes() == other.read_bytes(), f"{name}/{f.name}"


def test_manifest_lists_every_file(tiny_checkpoints: dict[str, Path]) -> None:
    root = tiny_checkpoints[tiny.CLIP_DIR].parent
    manifest = json.loads((root / tiny.MANIFEST).read_text())
    on_disk = {f.relative_to(root).as_posix() for d in tiny.ALL_DIRS for f in (root / d).iterdir()}
    assert set(manifest["files"]) == on_disk
    assert manifest["digest"] == RANDOM.digest()


def test_ensure_builds_once_and_repairs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = tiny.ensure_tiny_checkpoints(tmp_path)
    final = paths[tiny.CLIP_DIR].parent
    assert final.name == f"tiny-{tiny.TinySpec().digest()}"
    assert [p.name for p in tmp_path.iterdir()] == [final.name]  # no temp dirs left behind
    cfg = json.loads((paths[tiny.LEGACY_BIN] / "config.json").read_text())
    assert cfg["mm_vision_tower"] == str(paths[tiny.CLIP_DIR])

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("rebuilt a complete tree")

    monkeypatch.setattr(tiny, "build_tiny_checkpoints", boom)
    assert tiny.ensure_tiny_checkpoints(tmp_path) == paths
    monkeypatch.undo()

    (paths[tiny.HF_SAFETENSORS] / "config.json").write_text("{}")  # corrupt: must be rebuilt
    assert tiny.ensure_tiny_checkpoints(tmp_path) == paths
    assert json.loads((paths[tiny.HF_SAFETENSORS] / "config.json").read_text())["model_type"] == "llava"


def test_ensure_uses_env_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DYMU_CACHE", str(tmp_path / "envcache"))
    assert tiny.default_cache_root() == tmp_path / "envcache"


def test_spec_digest_tracks_dims() -> None:
    assert tiny.TinySpec().digest() == tiny.TinySpec().digest()
    assert tiny.TinySpec(seed=1).digest() != tiny.TinySpec().digest()
    with pytest.raises(ValueError):
        tiny.TinySpec(image_size=100)


# --------------------------------------------------------------------------------------------------
# Legacy (liuhaotian) format


def test_legacy_dirs_hold_the_same_tensors(tiny_checkpoints: dict[str, Path]) -> None:
    from_bin = _load_bin(tiny_checkpoints[tiny.LEGACY_BIN] / "pytorch_model.bin")
    from_st = _load_safetensors(tiny_checkpoints[tiny.LEGACY_SAFETENSORS] / "model.safetensors")
    _assert_same_tensors(from_bin, from_st)
    _assert_same_tensors(from_st, tiny.legacy_state_dict(RANDOM))
    assert not any("vision_tower" in k or k.startswith("vision_model") for k in from_st)
    for key in (
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.1.mlp.down_proj.weight",
        "model.layers.1.post_attention_layernorm.weight",
        "model.norm.weight",
        "lm_head.weight",
        "model.mm_projector.0.weight",
        "model.mm_projector.0.bias",
        "model.mm_projector.2.weight",
        "model.mm_projector.2.bias",
    ):
        assert key in from_st, key
    assert from_st["model.embed_tokens.weight"].shape == (tiny.TEXT_VOCAB_SIZE, 64)


def test_legacy_config(tiny_checkpoints: dict[str, Path]) -> None:
    for name in (tiny.LEGACY_BIN, tiny.LEGACY_SAFETENSORS):
        assert "llava" in name  # the legacy builder only takes the LLaVA path for such names
        cfg = json.loads((tiny_checkpoints[name] / "config.json").read_text())
        assert cfg["architectures"] == ["LlavaLlamaForCausalLM"]
        assert cfg["model_type"] == "llava_llama"
        assert Path(cfg["mm_vision_tower"]) == tiny_checkpoints[tiny.CLIP_DIR]
        assert Path(cfg["mm_vision_tower"]).is_absolute()
        assert cfg["mm_projector_type"] == "mlp2x_gelu"
        assert cfg["mm_vision_select_layer"] == -2
        assert cfg["mm_vision_select_feature"] == "patch"
        assert cfg["mm_use_im_start_end"] is False and cfg["mm_use_im_patch_token"] is False
        assert cfg["image_aspect_ratio"] == "pad"
        assert cfg["vocab_size"] == tiny.TEXT_VOCAB_SIZE
        for f in ("tokenizer.model", "tokenizer_config.json", "generation_config.json"):
            assert (tiny_checkpoints[name] / f).is_file(), f
        assert not (tiny_checkpoints[name] / "tokenizer.json").exists(), (
            "liuhaotian dirs ship tokenizer.model only"
        )


@pytest.mark.skipif(
    importlib.util.find_spec("llava") is None, reason="legacy llava package (llava-torch) not installed"
)
@pytest.mark.parametrize("name", [tiny.LEGACY_SAFETENSORS, tiny.LEGACY_BIN])
def test_legacy_loads_with_llava_package(tiny_checkpoints: dict[str, Path], name: str) -> None:
    from dymu.compat.legacy import import_legacy

    llava_cls = import_legacy().LlavaLlamaForCausalLM  # raises with the real import error, if any
    if name == tiny.LEGACY_BIN and _bin_refused():
        with pytest.raises(ValueError, match=r"torch"):  # transformers >= 4.52 on torch < 2.6
            llava_cls.from_pretrained(tiny_checkpoints[name])
        return
    model, info = llava_cls.from_pretrained(tiny_checkpoints[name], output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    _assert_same_tensors(dict(model.named_parameters()), tiny.legacy_state_dict(RANDOM))
    tower = model.get_vision_tower()
    tower.load_model()
    assert tower.num_patches == 64
    pixels = tower.image_processor(make_sample_images(1)[0], return_tensors="pt")["pixel_values"]
    assert tower(pixels).shape == (1, 64, 64)


# --------------------------------------------------------------------------------------------------
# llava-hf format


@pytest.mark.parametrize("name", [tiny.HF_SAFETENSORS, tiny.HF_BIN])
def test_hf_loads_with_all_weights(tiny_checkpoints: dict[str, Path], name: str) -> None:
    from transformers import LlavaForConditionalGeneration

    if name == tiny.HF_BIN and _bin_refused():  # transformers >= 4.52 on torch < 2.6 (CVE-2025-32434)
        with pytest.raises(ValueError, match=r"torch"):
            LlavaForConditionalGeneration.from_pretrained(tiny_checkpoints[name])
        return

    model, info = LlavaForConditionalGeneration.from_pretrained(
        tiny_checkpoints[name], output_loading_info=True
    )
    assert not info["missing_keys"], info
    assert not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    # Independent of loading_info: every parameter equals the source array under its hub key.
    loaded = {_hf_checkpoint_key(k): v.detach() for k, v in model.named_parameters()}
    _assert_same_tensors(loaded, tiny.hf_state_dict(RANDOM))
    assert model.config.image_token_index == tiny.TinySpec().image_token_id
    assert model.config.vision_feature_select_strategy == "default"
    assert model.config.vision_feature_layer == -2


def test_hf_text_weights_extend_legacy_ones() -> None:
    legacy, hf = tiny.legacy_state_dict(RANDOM), tiny.hf_state_dict(RANDOM)
    n = tiny.TEXT_VOCAB_SIZE
    for lk, hk in (("model.embed_tokens.weight", "language_model.model.embed_tokens.weight"),
                   ("lm_head.weight", "language_model.lm_head.weight")):  # fmt: skip
        assert hf[hk].shape == (tiny.TinySpec().hf_vocab_size, 64)
        assert hf[hk].shape[0] % 64 == 0
        assert torch.equal(hf[hk][:n], legacy[lk])
        assert not hf[hk][n:].any()
    assert torch.equal(hf["multi_modal_projector.linear_2.bias"], legacy["model.mm_projector.2.bias"])


def test_hf_bin_and_safetensors_hold_the_same_tensors(tiny_checkpoints: dict[str, Path]) -> None:
    _assert_same_tensors(
        _load_bin(tiny_checkpoints[tiny.HF_BIN] / "pytorch_model.bin"),
        _load_safetensors(tiny_checkpoints[tiny.HF_SAFETENSORS] / "model.safetensors"),
    )


def test_hf_generate_answers_what_the_picture_shows(trained_checkpoints: dict[str, Path]) -> None:
    """transformers' own LlavaForConditionalGeneration.generate (no dymu code) on the trained
    checkpoint: each sample picture gets its own answer, and the answer names its colour."""
    from transformers import AutoTokenizer, CLIPImageProcessor, LlavaForConditionalGeneration

    path = trained_checkpoints[tiny.HF_SAFETENSORS]
    model = LlavaForConditionalGeneration.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    image_processor = CLIPImageProcessor.from_pretrained(path)
    # transformers >= 4.47 expects the prompt already expanded to one <image> per feature.
    n_image = 64 if _tf_version() >= Version("4.47") else 1
    prompt = format_prompt(shapes.QUESTIONS["describe"]).replace("<image>", "<image>" * n_image)
    ids = torch.tensor([tok(prompt).input_ids])
    answers = []
    for scene, image in shapes.sample_pictures():
        pixels = image_processor(image, return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            out = model.generate(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=16, do_sample=False)  # fmt: skip
        answer = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
        assert scene.color in answer.split(), (scene, answer)
        answers.append(answer)
    assert len(set(answers)) == len(answers), answers


# --------------------------------------------------------------------------------------------------
# Vision tower and image processor


def test_clip_dir_loads(tiny_checkpoints: dict[str, Path]) -> None:
    from transformers import CLIPImageProcessor, CLIPVisionModel

    path = tiny_checkpoints[tiny.CLIP_DIR]
    model, info = CLIPVisionModel.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert model.config.hidden_act == "quick_gelu"
    # transformers 5 drops the "vision_model." level from CLIPVisionModel's parameter names.
    params = {
        (k if k.startswith("vision_model.") else f"vision_model.{k}"): v.detach()
        for k, v in model.eval().named_parameters()
    }
    _assert_same_tensors(params, tiny.clip_state_dict(RANDOM))
    processor = CLIPImageProcessor.from_pretrained(path)
    pixels = processor(make_sample_images(1)[0], return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 112, 112)
    with torch.no_grad():
        out = model(pixel_values=pixels, output_hidden_states=True)
    assert out.last_hidden_state.shape == (1, 65, 64)
    assert len(out.hidden_states) == 5  # embeddings + 4 layers; LLaVA takes hidden_states[-2]


def test_processor_configs(tiny_checkpoints: dict[str, Path]) -> None:
    for name in (tiny.CLIP_DIR, tiny.HF_SAFETENSORS, tiny.HF_BIN):
        cfg = json.loads((tiny_checkpoints[name] / "preprocessor_config.json").read_text())
        assert cfg["size"] == {"shortest_edge": 112}
        assert cfg["crop_size"] == {"height": 112, "width": 112}
        assert cfg["image_mean"] == tiny.CLIP_MEAN and cfg["image_std"] == tiny.CLIP_STD


# --------------------------------------------------------------------------------------------------
# Tokenizers


@pytest.mark.parametrize("name", [tiny.HF_SAFETENSORS, tiny.HF_BIN])
def test_hf_tokenizer_has_single_image_token(tiny_checkpoints: dict[str, Path], name: str) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_checkpoints[name])
    spec = tiny.TinySpec()
    assert tok("<image>", add_special_tokens=False).input_ids == [spec.image_token_id]
    assert tok.convert_tokens_to_ids("<image>") == spec.image_token_id
    assert tok.pad_token == "<pad>" and tok.pad_token_id == spec.pad_token_id
    assert tok(PROMPT).input_ids == GOLDEN_HF_PROMPT_IDS
    assert len(tok) == tiny.TEXT_VOCAB_SIZE + 2


def _slow_tokenizer_available() -> bool:
    return (
        _tf_version() < Version("5")
        and importlib.util.find_spec("sentencepiece") is not None
        and importlib.util.find_spec("google.protobuf") is not None
    )


@pytest.mark.parametrize("use_fast", [True, False])
def test_legacy_tokenizer_ids(tiny_checkpoints: dict[str, Path], use_fast: bool) -> None:
    """The way llava loads it (use_fast=False) and the fast path agree on the prompt chunks."""
    if not use_fast and not _slow_tokenizer_available():
        pytest.skip("slow LlamaTokenizer needs transformers < 5 with sentencepiece and protobuf")
    import transformers

    from dymu.compat.legacy import legacy_tokenizer

    # explicit classes: AutoTokenizer mis-resolves llava_llama on transformers 5.0-5.2 (the tokenizer fix)
    path = tiny_checkpoints[tiny.LEGACY_SAFETENSORS]
    tok = transformers.LlamaTokenizerFast.from_pretrained(str(path)) if use_fast else legacy_tokenizer(path)
    before, after = PROMPT.split("<image>")
    assert (tok(before).input_ids, tok(after).input_ids) == GOLDEN_LEGACY_CHUNK_IDS
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (1, 2, 0)
    assert len(tok) == tiny.TEXT_VOCAB_SIZE


def test_hf_slow_tokenizer_matches_fast(tiny_checkpoints: dict[str, Path]) -> None:
    if not _slow_tokenizer_available():
        pytest.skip("slow LlamaTokenizer needs transformers < 5 with sentencepiece and protobuf")
    from transformers import AutoTokenizer

    slow = AutoTokenizer.from_pretrained(tiny_checkpoints[tiny.HF_SAFETENSORS], use_fast=False)
    assert slow(PROMPT).input_ids == GOLDEN_HF_PROMPT_IDS


def test_committed_tokenizer_files_agree() -> None:
    """tiny_tokenizer.json reproduces the sentencepiece model (make_tiny_tokenizer.py --check)."""
    if importlib.util.find_spec("sentencepiece") is None:
        pytest.skip("sentencepiece not installed (only needed to check the committed .model file)")
    spec = importlib.util.spec_from_file_location(
        "make_tiny_tokenizer", Path(__file__).resolve().parents[1] / "scripts" / "make_tiny_tokenizer.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.check(tiny.TOKENIZER_MODEL.read_bytes(), tiny.TOKENIZER_JSON.read_text(encoding="utf-8"))


def test_hf_processor(tiny_checkpoints: dict[str, Path]) -> None:
    """AutoProcessor on the llava-hf dir, whose processor_config.json is shaped like the hub's.

    transformers < 4.43 passes processor_config.json's keys to a LlavaProcessor.__init__ that takes
    no ``**kwargs``: a TypeError (as with today's llava-hf hub files; a compat fix's job). 4.43 and
    4.44 drop the unknown keys and leave <image> unexpanded (the model expands it); 4.45+ expand it
    to one token per image feature.
    """
    from transformers import AutoProcessor, LlavaProcessor

    path = tiny_checkpoints[tiny.HF_SAFETENSORS]
    params = inspect.signature(LlavaProcessor.__init__).parameters
    if "patch_size" not in params and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        with pytest.raises(TypeError, match="unexpected keyword argument"):
            AutoProcessor.from_pretrained(path)
        return
    processor = AutoProcessor.from_pretrained(path)
    assert isinstance(processor, LlavaProcessor)
    inputs = processor(images=make_sample_images(1)[0], text=PROMPT, return_tensors="pt")
    ids = inputs["input_ids"][0].tolist()
    expanded = getattr(processor, "patch_size", None) is not None
    assert ids.count(tiny.TinySpec().image_token_id) == (64 if expanded else 1)
    assert inputs["pixel_values"].shape == (1, 3, 112, 112)
    if _tf_version() >= Version("4.47"):
        assert expanded
        messages = [
            {
                "role": "user",
                "content": [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}],
            }
        ]
        assert processor.apply_chat_template(messages, add_generation_prompt=True) == PROMPT


# --------------------------------------------------------------------------------------------------
# Sample images


def test_sample_images_are_deterministic_and_varied() -> None:
    first, second = make_sample_images(8), make_sample_images(8)
    arrays = [np.asarray(im) for im in first]
    assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(arrays, second, strict=True))
    digest = hashlib.sha256(b"".join(a.tobytes() for a in arrays)).hexdigest()
    assert digest == GOLDEN_IMAGES_SHA256
    assert all(im.mode == "RGB" for im in first)
    assert sum(im.width != im.height for im in first) == 2
    assert all(max(im.size) == 112 for im in first)
    for i in range(len(arrays)):
        for j in range(i + 1, len(arrays)):
            assert arrays[i].shape != arrays[j].shape or not np.array_equal(arrays[i], arrays[j])
    # Flat vs busy really differ: share of pixels equal to their right neighbour.
    flat = [float((a[:, 1:] == a[:, :-1]).all(-1).mean()) for a in arrays]
    assert flat[KINDS.index("flat")] > 0.95
    assert flat[KINDS.index("busy")] < 0.1
    assert make_sample_images(2, seed=1)[0].tobytes() != first[0].tobytes()


def test_write_sample_images_round_trips(tmp_path: Path) -> None:
    from PIL import Image

    paths = write_sample_images(tmp_path, n=3, size=56)
    assert [p.suffix for p in paths] == [".png"] * 3
    for i, p in enumerate(paths):
        with Image.open(p) as im:
            assert np.array_equal(np.asarray(im.convert("RGB")), sample_image_array(i, 56))
