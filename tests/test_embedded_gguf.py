"""The embedded SmolLM2-135M (Q4_1 GGUF) through our loader vs transformers' own GGUF loading."""

import chex
import numpy as np
import pytest
import torch

from spd_jax.config import GenerationConfig
from spd_jax.embedded import embedded_gguf_path
from spd_jax.generate import Generator
from spd_jax.loading import load_params
from spd_jax.plan import SyncPlan
from spd_jax.runtime import Engine, build_model_def

TEXT = "The capital of France is Paris. It is known for the Eiffel Tower and"


@pytest.fixture(scope="module")
def hf_ref():
    from transformers import AutoModelForCausalLM

    p = embedded_gguf_path()
    return AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32).eval()


def test_embedded_config(embedded):
    lm, _ = embedded
    c = lm.cfg
    assert (c.arch, c.n_layers, c.n_heads, c.n_kv_heads, c.hidden, c.vocab_size) == ("llama", 30, 9, 3, 576, 49152)


@pytest.mark.parametrize("tp", [1, 3])
def test_gguf_logits_and_greedy_tokens_match_transformers(embedded, hf_ref, tp):
    lm, tok = embedded
    ids = tok(TEXT)["input_ids"]
    with torch.no_grad():
        ref = hf_ref(torch.tensor([ids])).logits.numpy()[0]
        ref_gen = hf_ref.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False,
                                  attention_mask=torch.ones(1, len(ids), dtype=torch.long))[0, len(ids):].tolist()
    eng = Engine.create(build_model_def(lm.cfg, tp))
    params = load_params(eng, lm.source)
    ours = np.asarray(eng.logits(params, np.array([ids])))[0]
    chex.assert_trees_all_close(ours, ref, atol=2e-3, rtol=1e-3)
    assert (ours.argmax(-1) == ref.argmax(-1)).all()
    gen = Generator(eng, params, SyncPlan.from_flags((False,) * lm.cfg.n_layers)).generate([ids], GenerationConfig(max_new_tokens=10,
                                                                                              stop_at_eos=False))
    assert gen.tokens[0] == ref_gen
    if tp == 3:  # the done-criterion of the core issue: a sensible continuation at TP 3
        q = tok("The capital of France is")["input_ids"]
        g = Generator(eng, params, SyncPlan.from_flags((False,) * lm.cfg.n_layers)).generate([q], GenerationConfig(max_new_tokens=4))
        assert "Paris" in tok.decode(g.tokens[0])


def test_torch_free_gguf_config_and_tokenizer_equal_transformers():
    """Our GGUF header reader (no torch) gives transformers' config and token ids, special tokens included."""
    from transformers import AutoConfig, AutoTokenizer

    from spd_jax import gguf_meta
    from spd_jax.config import model_config_from_hf

    p = embedded_gguf_path()
    ref_cfg = model_config_from_hf(AutoConfig.from_pretrained(str(p.parent), gguf_file=p.name))
    assert model_config_from_hf(gguf_meta.hf_config(p)) == ref_cfg
    ours, ref = gguf_meta.tokenizer(p), AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
    texts = [TEXT, "", "  leading spaces,\ttabs\n\nand newlines 1234567 3.14159", "ünïcödé 日本語 😀 ﷽",
             "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n", "don't we'll <|endoftext|>x"]
    for t in texts:
        a, b = ours(t, add_special_tokens=True)["input_ids"], ref(t, add_special_tokens=True)["input_ids"]
        assert a == b, t
        assert ours.decode(a) == ref.decode(b) and ours.decode(a, skip_special_tokens=True) == ref.decode(
            b, skip_special_tokens=True)
    assert (len(ours), ours.bos_token, ours.eos_token, ours.pad_token) == (len(ref), ref.bos_token, ref.eos_token,
                                                                           ref.pad_token)


def _reader_view(path):
    """What llama.cpp's own reader makes of a file: the reference for spd_jax.gguf_file."""
    import gguf

    r = gguf.GGUFReader(str(path))
    meta = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    return meta, {t.name: (t.tensor_type, tuple(int(x) for x in t.shape), t.data) for t in r.tensors}


def _assert_same_as_reader(path):
    from spd_jax.gguf_file import read_gguf

    meta, tensors = _reader_view(path)
    f = read_gguf(path)
    assert f.meta == meta
    assert [type(v) for v in f.meta.values()] == [type(v) for v in meta.values()]
    assert list(f.tensors) == list(tensors)
    for name, (qtype, shape, data) in tensors.items():
        t = f.tensors[name]
        assert (t.tensor_type, t.shape, t.data.dtype, t.data.shape) == (qtype, shape, data.dtype, data.shape), name
        np.testing.assert_array_equal(t.data, data, err_msg=name)


def test_gguf_header_parser_equals_llama_cpp_reader_on_the_embedded_file():
    _assert_same_as_reader(embedded_gguf_path())


def test_gguf_header_parser_equals_llama_cpp_reader_on_every_value_and_tensor_type(tmp_path):
    import gguf

    path = tmp_path / "all.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint8("t.u8", 7)
    w.add_int8("t.i8", -7)
    w.add_uint16("t.u16", 60000)
    w.add_int16("t.i16", -30000)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -2_000_000_000)
    w.add_uint64("t.u64", 2**60)
    w.add_int64("t.i64", -(2**60))
    w.add_float32("t.f32", 0.1)
    w.add_float64("t.f64", 0.1)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo ✓")
    w.add_array("t.ints", [1, -2, 3])
    w.add_array("t.floats", [0.5, -1.25])
    w.add_array("t.strs", ["a", "", "ü"])
    w.add_array("t.empty", [])
    rng = np.random.default_rng(0)
    w.add_tensor("f32", rng.standard_normal((3, 5)).astype(np.float32))
    w.add_tensor("f16", rng.standard_normal((4, 2)).astype(np.float16))
    w.add_tensor("i32", np.arange(6, dtype=np.int32).reshape(2, 3))
    q = gguf.quantize(rng.standard_normal((2, 64)).astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("q8", q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    _assert_same_as_reader(path)


def test_gguf_header_parser_refuses_a_damaged_file(tmp_path):
    from spd_jax.config import WeightLoadError
    from spd_jax.gguf_meta import read_header

    src = embedded_gguf_path().read_bytes()
    for name, data in (("truncated.gguf", src[:5000]), ("foreign.gguf", b"PK\x03\x04" + src[4:5000])):
        p = tmp_path / name
        p.write_bytes(data)
        with pytest.raises(WeightLoadError, match="not a readable GGUF file"):
            read_header(str(p))
