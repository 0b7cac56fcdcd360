"""VARPipeline: parity with FoundationVision/VAR's sampler (every recorded case), the guidance mapping, the two RNG
modes, top-k / top-p, callbacks, saving and loading, the folder's settings, the wrong family, argument errors.

The diffusers checks (offloading, dtypes, variants, diffusers' own callback checks) run on VAR in
test_pipeline_common_mar.py."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from diffusers.callbacks import PipelineCallback

from diffusers_mar import ARPipeline, MARPipeline, VARPipeline, VARVQModel
from diffusers_mar.pipelines.pipeline_var import filter_logits
from tests.testing_utils import (
    TINY_VAR_VQ_CONFIG,
    make_tiny_pipeline,
    make_tiny_var_pipeline,
    var_fixture_config,
    var_fixture_io,
    var_fixture_pipeline,
    var_sample_atol,
)

CASES = ["sample_cfg1.5", "sample_cfg4", "sample_smooth", "sample_random_labels", "sample_shared_aln"]
ALL_INPUTS = ["latents", "indices", "logits"]


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _record(store: list, names: list[str] = ALL_INPUTS):
    """A callback that keeps a copy of the tensors of every scale."""

    def callback(pipe, scale, timestep, callback_kwargs):
        store.append({name: value.clone() for name, value in callback_kwargs.items()} | {"timestep": timestep})
        return {}

    return callback


def _run(pipe: VARPipeline, labels, record: list | None = None, **kwargs) -> torch.Tensor:
    if record is not None:
        kwargs.update(callback_on_step_end=_record(record), callback_on_step_end_tensor_inputs=ALL_INPUTS)
    return pipe(labels, output_type=kwargs.pop("output_type", "pt"), **kwargs).images


# ---------------------------------------------------------------------------------------------------------------------
# Parity with FoundationVision/VAR 78b9539 `autoregressive_infer_cfg` (tests/fixtures/var_tiny/README.md)


@pytest.mark.parity
@pytest.mark.parametrize("case", CASES)
def test_every_recorded_sampling_case_matches_the_original(case):
    io, setting = var_fixture_io(), var_fixture_config()["sample_cases"][case]
    pipe = var_fixture_pipeline(setting["var"])
    generator = _seeded(setting["g_seed"])  # the original's `rng.manual_seed(g_seed)`
    labels = setting["label_B"]
    if labels is None:  # the original draws the labels first, from the same generator
        labels = torch.multinomial(torch.full((1, 10), 0.1), 2, replacement=True, generator=generator).reshape(2)
    assert torch.equal(torch.as_tensor(labels), io[f"{case}.labels"])
    record = []
    images = _run(
        pipe,
        labels,
        record,
        guidance_scale=1 + setting["cfg"],  # our guidance scale is 1 + cfg
        top_k=setting["top_k"],
        top_p=setting["top_p"],
        more_smooth=setting["more_smooth"],
        generator=generator,
    )
    assert len(record) == 4
    for scale, tensors in enumerate(record):
        assert torch.equal(tensors["indices"], io[f"{case}.idx.{scale}"])
        expected = io[f"{case}.logits_filtered.{scale}"]
        assert torch.equal(tensors["logits"].isinf(), expected.isinf())  # the same tokens filtered out
        finite = expected.isfinite()
        torch.testing.assert_close(tensors["logits"][finite], expected[finite], rtol=0, atol=1e-5)
        torch.testing.assert_close(tensors["latents"], io[f"{case}.f_hat.{scale}"], rtol=0, atol=var_sample_atol(case))
    torch.testing.assert_close(images, io[f"{case}.image"], rtol=0, atol=var_sample_atol(case))


# ---------------------------------------------------------------------------------------------------------------------
# The guidance mapping: uncond + s (cond - uncond), s = 1 + (guidance_scale - 1) k / (K - 1)


def _raw_logits(pipe: VARPipeline, store: list):
    """Record the labels and the unguided logits of every transformer call."""

    def hook(module, args, kwargs, output):
        store.append((args[0].tolist(), output[0].float().clone()))

    return pipe.transformer.register_forward_hook(hook, with_kwargs=True)


def test_guidance_is_uncond_plus_scale_times_the_difference_rising_over_the_scales():
    pipe = make_tiny_var_pipeline()
    raw, record = [], []
    _raw_logits(pipe, raw)
    _run(pipe, [1, 2], record, guidance_scale=4.0, top_k=0, top_p=0.0, generator=_seeded(0))
    assert [labels for labels, _ in raw] == [[1, 2, 10, 10]] * 3  # conditional rows first, then the null class
    for scale, ((_, logits), tensors) in enumerate(zip(raw, record)):
        cond, uncond = logits.chunk(2)
        s = 1 + (4.0 - 1) * scale / 2
        assert (cond - uncond).abs().amax() > 0.01  # the halves differ, so a swap would show
        torch.testing.assert_close(tensors["logits"], uncond + s * (cond - uncond), rtol=1e-5, atol=1e-5)


def test_guidance_scale_one_skips_the_unconditional_half_and_equals_a_zero_guidance_weight():
    pipe = make_tiny_var_pipeline()
    raw, plain, cut = [], [], []
    _raw_logits(pipe, raw)
    images = _run(pipe, [1, 2], plain, guidance_scale=1.0, generator=_seeded(3))
    assert [labels for labels, _ in raw] == [[1, 2]] * 3 and pipe.do_classifier_free_guidance is False

    def guidance_off(pipeline, scale, timestep, callback_kwargs):
        pipeline._guidance_scale = 1.0  # t = 0 at every scale (it is 0 at the first anyway): the conditional logits
        cut.append(callback_kwargs["indices"].clone())
        return {}

    raw.clear()
    cut_images = pipe(
        [1, 2],
        guidance_scale=3.0,
        generator=_seeded(3),
        output_type="pt",
        callback_on_step_end=guidance_off,
        callback_on_step_end_tensor_inputs=["indices"],
    ).images
    assert [labels for labels, _ in raw] == [[1, 2, 10, 10]] * 3  # the batch stays doubled for the call
    assert all(torch.equal(a["indices"], b) for a, b in zip(plain, cut))
    torch.testing.assert_close(cut_images, images, rtol=0, atol=1e-5)


class GuidanceCutoffCallback(PipelineCallback):
    """A diffusers callback class in the way of `SDCFGCutoffCallback`: guidance off (scale 1) after the cutoff; it
    keeps the logits each scale sampled from."""

    tensor_inputs = ["logits"]

    def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
        self.logits = [*getattr(self, "logits", []), callback_kwargs["logits"].clone()]
        if step_index == self.config.cutoff_step_index:
            pipeline._guidance_scale = 1.0
        return callback_kwargs


def test_a_callback_class_that_changes_guidance_takes_effect_at_the_next_scale():
    pipe = make_tiny_var_pipeline()
    raw = []
    _raw_logits(pipe, raw)
    settings = {"guidance_scale": 5.0, "top_k": 0, "top_p": 0.0, "output_type": "pt"}
    plain = pipe([1, 2], generator=_seeded(1), **settings).images
    raw.clear()
    callback = GuidanceCutoffCallback(cutoff_step_ratio=None, cutoff_step_index=1)
    cut = pipe([1, 2], generator=_seeded(1), callback_on_step_end=callback, **settings).images
    assert pipe.guidance_scale == 1.0 and pipe.do_classifier_free_guidance is False
    assert [labels for labels, _ in raw] == [[1, 2, 10, 10]] * 3  # the batch stays doubled for the call
    cond, uncond = raw[1][1].chunk(2)
    torch.testing.assert_close(callback.logits[1], uncond + 3.0 * (cond - uncond))  # scale 1: s = 1 + 4 / 2
    assert torch.equal(callback.logits[2], raw[2][1].chunk(2)[0])  # after the cutoff: the conditional logits
    assert not torch.equal(cut, plain)


# ---------------------------------------------------------------------------------------------------------------------
# Random numbers: one generator draws as the original's rng; one generator per image makes batch == single


@pytest.mark.parametrize("more_smooth", [False, True], ids=["sampled", "smooth"])
def test_one_generator_per_image_gives_each_image_as_generated_alone(more_smooth):
    pipe = make_tiny_var_pipeline()
    settings = {"more_smooth": more_smooth, "guidance_scale": 3.0}
    batch, alone = [], [[], []]
    images = _run(pipe, [1, 2], batch, generator=[_seeded(10), _seeded(11)], **settings)
    singles = [_run(pipe, [label], alone[i], generator=_seeded(10 + i), **settings) for i, label in enumerate([1, 2])]
    for scale in range(3):
        for i in range(2):
            assert torch.equal(batch[scale]["indices"][i], alone[i][scale]["indices"][0])
    torch.testing.assert_close(images, torch.cat(singles), rtol=0, atol=1e-5)
    # One generator for the batch draws once for all images: not the per-image streams.
    together = []
    _run(pipe, [1, 2], together, generator=_seeded(10), **settings)
    assert any(not torch.equal(a["indices"], b["indices"]) for a, b in zip(together, batch))


def test_more_smooth_draws_the_tokens_and_then_mixes_the_codebook():
    pipe = make_tiny_var_pipeline()
    hard, smooth = [], []
    hard_latents = _run(pipe, [1, 2], hard, generator=_seeded(4), output_type="latent")
    smooth_latents = _run(pipe, [1, 2], smooth, generator=_seeded(4), more_smooth=True, output_type="latent")
    assert torch.equal(hard[0]["indices"], smooth[0]["indices"])  # the multinomial draw still comes first
    assert not torch.allclose(hard[0]["latents"], smooth[0]["latents"])  # but the codes are a Gumbel-softmax mix
    assert not torch.allclose(hard_latents, smooth_latents)


def test_top_k_keeps_ties_and_top_p_always_keeps_the_largest():
    logits = torch.tensor([[[1.0, 3.0, 2.0, 2.0, 0.0]]])
    inf = -torch.inf
    assert torch.equal(filter_logits(logits, 2, 0.0), torch.tensor([[[inf, 3.0, 2.0, 2.0, inf]]]))  # tie kept
    assert torch.equal(filter_logits(logits, 0, 0.0), logits)
    # Softmax of [3, 2, 2, 1, 0]: 0.4,0.15,0.15,0.05,0.02 (rounded); ascending cumulative sums 0.02, 0.07, 0.22, ...
    probs = logits.softmax(-1)[0, 0]
    order = probs.argsort()
    cumulative = probs[order].cumsum(0)
    top_p = float(1 - (cumulative[1] + cumulative[2]) / 2)  # removes exactly the two smallest
    expected = logits.clone()
    expected[0, 0, order[:2]] = inf
    assert torch.equal(filter_logits(logits, 0, top_p), expected)
    only_largest = torch.full_like(logits, inf)
    only_largest[0, 0, 1] = 3.0
    assert torch.equal(filter_logits(logits, 0, 1e-6), only_largest)  # the largest always stays
    assert torch.equal(filter_logits(logits, 0, 1.0), logits)


# ---------------------------------------------------------------------------------------------------------------------
# Callbacks


def test_callback_reads_every_scale_and_its_latents_written_back_feed_the_next_scale():
    pipe = make_tiny_var_pipeline()
    record, inputs = [], []
    pipe.transformer.register_forward_pre_hook(lambda module, args, kwargs: inputs.append(args[1]), with_kwargs=True)
    latents = _run(pipe, [1, 2], record, generator=_seeded(0), output_type="latent")
    assert [r["timestep"] for r in record] == [13, 9, 0]  # tokens still to make after the scale
    assert [tuple(r["latents"].shape) for r in record] == [(2, 4, 3, 3)] * 3
    assert [tuple(r["indices"].shape) for r in record] == [(2, 1), (2, 4), (2, 9)]
    assert [tuple(r["logits"].shape) for r in record] == [(2, 1, 32), (2, 4, 32), (2, 9, 32)]
    assert torch.equal(latents, record[-1]["latents"])
    assert inputs[0] is None and inputs[1].shape == (4, 4, 4)  # (2B, 2x2 tokens, C): both halves

    def zero_after_first(pipeline, scale, timestep, callback_kwargs):
        return {"latents": torch.zeros_like(callback_kwargs["latents"])} if scale == 0 else {}

    inputs.clear()
    changed = pipe([1, 2], generator=_seeded(0), output_type="latent", callback_on_step_end=zero_after_first).images
    assert inputs[1].abs().sum() == 0  # the next scale read the latents the callback wrote
    assert not torch.allclose(changed, latents)

    def zero_at_the_end(pipeline, scale, timestep, callback_kwargs):
        callback_kwargs["latents"] = torch.zeros_like(callback_kwargs["latents"])
        return callback_kwargs

    assert (
        _run(pipe, [1, 2], generator=_seeded(0), output_type="latent", callback_on_step_end=zero_at_the_end)
        .abs()
        .sum()
        == 0
    )


def test_interrupt_decodes_the_scales_made_so_far():
    pipe = make_tiny_var_pipeline()
    record, calls = [], []
    pipe.transformer.register_forward_pre_hook(lambda *args: calls.append(1))

    def stop_after_two(pipeline, scale, timestep, callback_kwargs):
        record.append(callback_kwargs["latents"].clone())
        pipeline._interrupt = scale == 1
        return {}

    latents = pipe([1, 2], generator=_seeded(0), output_type="latent", callback_on_step_end=stop_after_two).images
    assert len(calls) == 2 and len(record) == 2 and torch.equal(latents, record[1])
    images = pipe([1, 2], generator=_seeded(0), output_type="pt", callback_on_step_end=stop_after_two).images
    torch.testing.assert_close(images, (pipe.vqvae.decode_latents(latents).sample + 1) / 2, rtol=0, atol=1e-6)


def test_the_kv_cache_is_released_before_decoding(monkeypatch):
    # With the cache alive under the decoder, d16 at batch 8 peaked at 2.8 GB against the official's 2.0 GB
    # (docs/benchmarks.md, bench_var.py); released, the decoder's activations reuse its memory.
    pipe = make_tiny_var_pipeline()
    caches, alive = [], []
    make_kv_cache, decode_latents = pipe.transformer.make_kv_cache, pipe.vqvae.decode_latents
    monkeypatch.setattr(pipe.transformer, "make_kv_cache", lambda *a: caches.append(make_kv_cache(*a)) or caches[-1])

    def decode(*args, **kwargs):
        alive.append(sys.getrefcount(caches[0]) - 1)  # references beyond `caches` itself
        return decode_latents(*args, **kwargs)

    monkeypatch.setattr(pipe.vqvae, "decode_latents", decode)
    pipe([1, 2], generator=_seeded(0), output_type="pt")
    assert alive == [1]  # only the test's list and getrefcount's argument: the pipeline holds it no more


# ---------------------------------------------------------------------------------------------------------------------
# Outputs, settings, saving, loading


def test_output_types_and_labels_by_name():
    pipe = make_tiny_var_pipeline(id2label={0: "zero", 1: "one, uno"})
    assert pipe.get_label_ids(["uno", "zero"]) == [1, 0]
    pil = pipe(pipe.get_label_ids(["one"]), generator=_seeded(0)).images
    assert [(image.size, image.mode) for image in pil] == [((6, 6), "RGB")]
    as_np = pipe(1, generator=_seeded(0), output_type="np").images
    as_pt = pipe(torch.tensor([1]), generator=_seeded(0), output_type="pt").images
    assert as_np.shape == (1, 6, 6, 3) and as_pt.shape == (1, 3, 6, 6) and 0 <= as_pt.min() and as_pt.max() <= 1
    np.testing.assert_array_equal(np.asarray(pil[0]), np.round(as_np[0] * 255).astype(np.uint8))
    latents = pipe([1], generator=_seeded(0), output_type="latent").images
    assert latents.shape == (1, 4, 3, 3)
    torch.testing.assert_close(as_pt, (pipe.vqvae.decode_latents(latents).sample + 1) / 2, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match=r"get_label_ids\(\['one'\]\)"):
        pipe("one")


def test_defaults_are_the_original_fid_setting_clipped_unless_the_folder_stores_its_own(tmp_path):
    pipe = make_tiny_var_pipeline()
    # cfg 1.5 -> guidance 2.5, top-k 900 clipped to the 32 codes, top-p 0.96, no smoothing
    assert pipe.sampling_defaults == {"guidance_scale": 2.5, "top_k": 32, "top_p": 0.96, "more_smooth": False}
    default_run = _run(pipe, [1, 2], generator=_seeded(0))
    assert torch.equal(default_run, _run(pipe, [1, 2], generator=_seeded(0), **pipe.sampling_defaults))
    pipe.set_sampling_defaults(guidance_scale=4.0, top_k=8)
    assert pipe.sampling_defaults == {"guidance_scale": 4.0, "top_k": 8, "top_p": 0.96, "more_smooth": False}
    pipe.save_pretrained(tmp_path)
    (tmp_path / "README.md").write_text("# A card\n")
    loaded = DiffusionPipeline.from_pretrained(tmp_path)  # the class comes from model_index.json
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded) is VARPipeline and loaded.config.sampling == {"guidance_scale": 4.0, "top_k": 8}
    assert torch.equal(_run(loaded, [1, 2], generator=_seeded(0)), _run(pipe, [1, 2], generator=_seeded(0)))
    assert not torch.equal(_run(loaded, [1, 2], generator=_seeded(0)), default_run)
    loaded.save_pretrained(tmp_path / "again")
    assert (tmp_path / "again" / "README.md").read_text() == "# A card\n"


def test_bfloat16_loads_and_runs(tmp_path):
    make_tiny_var_pipeline().save_pretrained(tmp_path)
    pipe = VARPipeline.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.transformer.dtype == pipe.vqvae.dtype == torch.bfloat16
    for more_smooth in (False, True):
        images = _run(pipe, [1, 2], generator=_seeded(0), more_smooth=more_smooth)
        assert images.dtype == torch.float32 and images.shape == (2, 3, 6, 6) and torch.isfinite(images).all()


def test_a_folder_of_another_family_is_refused_both_ways_with_the_class_to_use(tmp_path):
    make_tiny_var_pipeline().save_pretrained(tmp_path / "var")
    make_tiny_pipeline(clip_sample=True).save_pretrained(tmp_path / "mar")
    with pytest.raises(ValueError, match="the folder holds a MARPipeline. Load it with `MARPipeline.from_pretrained"):
        VARPipeline.from_pretrained(tmp_path / "mar")
    for pipeline_class in (MARPipeline, ARPipeline):
        with pytest.raises(ValueError, match="got a VARTransformer2DModel: the folder holds a VARPipeline. Load it"):
            pipeline_class.from_pretrained(tmp_path / "var")
    mar = make_tiny_pipeline(clip_sample=True)
    var = make_tiny_var_pipeline()
    with pytest.raises(ValueError, match="must be a VARTransformer2DModel, got a MARTransformer2DModel"):
        VARPipeline(mar.transformer, var.vqvae)
    with pytest.raises(ValueError, match="`vqvae` must be a VARVQModel"):
        VARPipeline(var.transformer, mar.diffusion_head)
    other = VARVQModel(**{**TINY_VAR_VQ_CONFIG, "num_vq_embeddings": 16})
    with pytest.raises(ValueError, match=r"does not belong.*\(\[1, 2, 3\], 16, 4\).*\(\[1, 2, 3\], 32, 4\)"):
        VARPipeline(var.transformer, other)


@pytest.mark.parametrize(
    "arguments, match",
    [
        ({"guidance_scale": -1.0}, r"`guidance_scale` must be a finite number >= 0"),
        ({"top_k": 33}, r"`top_k` must be an int in \[0, 32\] \(the codebook size\)"),
        ({"top_k": 2.0}, r"`top_k` must be an int"),
        ({"top_p": 1.5}, r"`top_p` must be a number in \[0, 1\]"),
        ({"more_smooth": 1}, r"`more_smooth` must be True or False"),
        ({"output_type": "jpg"}, r"`output_type` must be one of \('pil', 'np', 'pt', 'latent'\)"),
        ({"class_labels": [11]}, r"`class_labels` must be in \[0, 10\]"),
        ({"class_labels": [-1]}, r"`class_labels` must be in \[0, 10\] \(10 = unconditional\)"),  # not -1 as VAR's
        ({"num_images_per_label": 0}, r"`num_images_per_label` must be an int >= 1"),
        ({"generator": [torch.Generator()]}, r"one generator per image"),
        ({"callback_on_step_end_tensor_inputs": ["tokens"]}, r"allowed: \['latents', 'indices', 'logits'\]"),
        ({"mask": torch.zeros(2, 9)}, r"`indices` and `mask` go together"),
        ({"mask": torch.zeros(2, 4), "indices": []}, r"`mask` must be a \(2, 9\) tensor of 0"),
        ({"mask": torch.zeros(2, 9), "indices": [torch.zeros(2, 1)]}, r"`indices` must be a list of 3 integer"),
    ],
)
def test_argument_errors_name_the_argument_and_allowed_values(arguments, match):
    pipe = make_tiny_var_pipeline()
    arguments = {"class_labels": [1, 2], "callback_on_step_end": lambda *args: {}, **arguments}
    with pytest.raises(ValueError, match=match):
        pipe(**arguments)


def test_stored_settings_are_checked():
    with pytest.raises(ValueError, match=r"`sampling\['top_k'\]` must be an int in \[0, 32\]"):
        make_tiny_var_pipeline(sampling={"top_k": 100})
    with pytest.raises(ValueError, match=r"unknown keys \['temperature'\]"):
        make_tiny_var_pipeline(sampling={"temperature": 1.0})
    with pytest.raises(ValueError, match=r"`top_p` must be a number in \[0, 1\]"):
        make_tiny_var_pipeline().set_sampling_defaults(top_p=2)
