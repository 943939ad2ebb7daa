"""text-generation-webui's samplers (issue 25): each one against a reference computed apart from nbllm's code
(llama.cpp's own sampler called through llama_cpp, transformers' processor, or text-generation-webui's
definition written out here), then through both loaders, servers' dialects, sweeps and refusals."""

from __future__ import annotations

import ctypes
import math
import warnings

import numpy as np
import pytest
import torch

import nbllm
from nbllm.errors import NbllmWarning, OptionError
from nbllm.loaders._samplers import (
    Dry,
    DynamicTemperature,
    FrequencyPenalty,
    Mirostat,
    PresencePenalty,
    QuadraticSampling,
    RepetitionPenalty,
    TopA,
    TopNSigma,
    Xtc,
    refuse_samplers,
    server_sampler_fields,
    transformers_processors,
)
from nbllm.options import SAMPLER_ORDER, GenerationOptions

LOGITS = [3.0, 2.5, 2.4, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0, -4.0, 1.7, 2.9]
"""A fixed logits vector (12 tokens) every reference works on."""


def _scores() -> torch.Tensor:
    return torch.tensor([LOGITS], dtype=torch.float32)


def _kept(scores: torch.Tensor) -> set[int]:
    return {i for i, v in enumerate(scores[0].tolist()) if math.isfinite(v)}


# -- llama.cpp's own samplers, applied to the fixed vector ---------------------------------------------
@pytest.fixture(scope="module")
def vocab_llm(tiny_gguf):
    llama_cpp = pytest.importorskip("llama_cpp")
    return llama_cpp.Llama(model_path=str(tiny_gguf), vocab_only=True, verbose=False)


def llama_apply(add, accepted=(), logits=LOGITS, n_vocab=None) -> dict[int, float]:
    """Apply one llama.cpp sampler (``add(chain)`` adds it) to ``logits``: token → logit of those kept."""
    import llama_cpp
    from llama_cpp import _internals

    chain = _internals.LlamaSampler()
    add(chain)
    for token in accepted:
        chain.accept(token)
    n = len(logits)
    data = (llama_cpp.llama_token_data * n)(*[llama_cpp.llama_token_data(i, v, 0.0) for i, v in enumerate(logits)])
    array = llama_cpp.llama_token_data_array(data=ctypes.cast(data, llama_cpp.llama_token_data_p), size=n,
                                             selected=-1, sorted=False)
    llama_cpp.llama_sampler_apply(chain.sampler, ctypes.byref(array))
    return {array.data[i].id: array.data[i].logit for i in range(array.size) if math.isfinite(array.data[i].logit)}


def test_top_n_sigma_keeps_what_llama_cpp_keeps():
    for n in (0.5, 1.0, 2.0):
        ours = _kept(TopNSigma(n)(None, _scores()))
        assert ours == set(llama_apply(lambda c, n=n: c.add_top_n_sigma(n))), n
        assert 0 < len(ours) < len(LOGITS)  # the vector is one where it cuts


def test_xtc_removes_what_llama_cpp_removes():
    for threshold in (0.05, 0.1, 0.2):
        ours = _kept(Xtc(threshold, 1.0, special=[]).remove(_scores()))
        assert ours == set(llama_apply(lambda c, t=threshold: c.add_xtc(1.0, t, 1, 1))), threshold
    assert 0 not in _kept(Xtc(0.1, 1.0, special=[]).remove(_scores()))  # the top choice went
    assert _kept(Xtc(0.1, 1.0, special=[0]).remove(_scores())) == set(range(len(LOGITS)))  # never an EOS/newline


def test_dynamic_temperature_matches_llama_cpps_temp_ext():
    low, high, exponent = 0.5, 1.5, 1.3
    ours = torch.softmax(DynamicTemperature(low, high, exponent)(None, _scores()), -1)[0].numpy()
    theirs = llama_apply(lambda c: c.add_temp_ext((low + high) / 2, (high - low) / 2, exponent))
    expected = np.exp(np.array([theirs[i] for i in range(len(LOGITS))]))
    assert np.allclose(ours, expected / expected.sum(), atol=1e-5)


def test_penalties_match_llama_cpp_over_a_range(vocab_llm):
    seen = [0, 1, 1, 2, 5, 5, 5]
    window = 4  # the last 4: 2, 5, 5, 5
    theirs = llama_apply(lambda c: c.add_penalties(vocab_llm._n_vocab, window, 1.3, 0.4, 0.6), accepted=seen,
                         logits=LOGITS)
    ids = torch.tensor([seen])
    ours = RepetitionPenalty(1.3, window)(ids, _scores())
    ours = FrequencyPenalty(0.4, window)(ids, ours)
    ours = PresencePenalty(0.6, window)(ids, ours)
    assert np.allclose(ours[0].numpy(), [theirs[i] for i in range(len(LOGITS))], atol=1e-5)
    # text-generation-webui's definitions by hand: 5 appears 3 times, 2 once; 0 and 1 are out of range
    hand = list(LOGITS)
    hand[5] = hand[5] / 1.3 - 0.4 * 3 - 0.6  # 0.0 stays 0.0 before the subtractions
    hand[2] = hand[2] / 1.3 - 0.4 - 0.6
    assert np.allclose(ours[0].numpy(), hand, atol=1e-6)


def test_repetition_penalty_with_no_range_is_transformers():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    ids = torch.tensor([[0, 3, 9, 3]])
    assert torch.allclose(RepetitionPenalty(1.2)(ids, _scores()), RepetitionPenaltyLogitsProcessor(1.2)(ids, _scores()))


def test_dry_penalizes_as_text_generation_webui_and_llama_cpp(vocab_llm):
    ids = [1, 2, 3, 4, 7, 1, 2, 3]  # "1 2 3" again: 4 would extend a 3-token repeat
    dry = Dry(0.8, 1.75, 2, breakers=[])
    assert dry.match_lengths(ids) == {4: 3}
    ours = dry(torch.tensor([ids]), _scores())[0].tolist()
    hand = list(LOGITS)
    hand[4] -= 0.8 * 1.75 ** (3 - 2)
    assert np.allclose(ours, hand)
    theirs = llama_apply(lambda c: c.add_dry(vocab_llm._model, 0.8, 1.75, 2, 64, []), accepted=ids)
    assert np.allclose(ours, [theirs[i] for i in range(len(LOGITS))], atol=1e-5)
    assert torch.equal(Dry(0.8, 1.75, 2, breakers=[2])(torch.tensor([ids]), _scores()), _scores())  # broken by 2
    assert torch.equal(Dry(0.8, 1.75, 4, breakers=[])(torch.tensor([ids]), _scores()), _scores())  # allowed 4


def test_top_a_and_smoothing_are_text_generation_webuis_definitions():
    probs = np.exp(LOGITS) / np.exp(LOGITS).sum()
    assert _kept(TopA(0.5)(None, _scores())) == {i for i, p in enumerate(probs) if p >= 0.5 * probs.max() ** 2}
    factor, curve = 0.4, 2.0
    d = np.array(LOGITS) - max(LOGITS)
    k, s = (3 - curve) / 2, (curve - 1) / 2
    expected = -(k * factor * d**2) + s * factor * d**3 + max(LOGITS)
    assert np.allclose(QuadraticSampling(factor, curve)(None, _scores())[0].numpy(), expected, atol=1e-5)


def test_mirostat_2_draws_within_the_surprise_bound_and_moves_it():
    torch.manual_seed(0)
    m = Mirostat(2, tau=1.0, eta=0.1)
    probs = np.exp(LOGITS) / np.exp(LOGITS).sum()
    allowed = {i for i, p in enumerate(probs) if -math.log2(p) <= 2.0}  # mu starts at 2 * tau
    out = m(None, _scores())
    (pick,) = _kept(out)
    assert pick in allowed
    kept = probs[sorted(allowed)] / probs[sorted(allowed)].sum()
    p_pick = kept[sorted(allowed).index(pick)]
    assert m.mu == pytest.approx(2.0 - 0.1 * (-math.log2(p_pick) - 1.0), rel=1e-5)


def test_processors_follow_sampler_priority_and_temperature_last():
    opts = GenerationOptions(temperature=0.8, top_k=5, min_p=0.05, top_a=0.1, xtc_probability=0.5,
                             presence_penalty=0.3, epsilon_cutoff=3.0, no_repeat_ngram_size=3)
    names = [type(p).__name__ for p in transformers_processors(opts, eos=[0], newline=[1], breakers=[], device="cpu")]
    assert names == ["PresencePenalty", "TemperatureLogitsWarper", "TopKLogitsWarper", "TopPLogitsWarper",
                     "EpsilonLogitsWarper", "TopA", "MinPLogitsWarper", "Xtc", "NoRepeatNGramLogitsProcessor"]
    last = opts.replace(temperature_last=True, sampler_priority=["min_p", "top_k"])
    names = [type(p).__name__ for p in transformers_processors(last, eos=[0], newline=[1], breakers=[], device="cpu")]
    assert names == ["MinPLogitsWarper", "TopKLogitsWarper", "PresencePenalty", "TopPLogitsWarper",
                     "EpsilonLogitsWarper", "TopA", "Xtc", "NoRepeatNGramLogitsProcessor", "TemperatureLogitsWarper"]


# -- the schema ------------------------------------------------------------------------------------------
def test_defaults_are_off_and_change_nothing():
    opts = GenerationOptions()
    assert opts.active_samplers() == [] and opts.changed() == {}
    assert opts.sampler_order == list(SAMPLER_ORDER)
    assert opts.sequence_breakers == ["\n", ":", '"', "*"]  # text-generation-webui's default, in its format


@pytest.mark.parametrize(("values", "words"), [
    ({"sampler_priority": ["top_k", "nope"]}, "--sampler-priority 'nope' is not a sampler"),
    ({"dynatemp_low": 2.0, "dynatemp_high": 1.0}, "--dynatemp-low 2 is above --dynatemp-high 1"),
    ({"logit_bias": ["13"]}, "--logit-bias '13' is not TOKEN_ID:BIAS"),
    ({"custom_token_bans": "1,x"}, "--custom-token-bans '1,x' is not a list of token ids"),
    ({"dry_sequence_breakers": "\\n"}, "is not a list of quoted strings"),
    ({"mirostat_mode": 3}, "--mirostat-mode 3 is not valid"),
])
def test_bad_values_are_refused_in_one_line(values, words):
    with pytest.raises(OptionError, match=words) as caught:
        GenerationOptions(**values)
    assert "\n" not in str(caught.value)


def test_greedy_says_which_samplers_do_nothing():
    with pytest.warns(NbllmWarning, match="xtc_probability, top_a have no effect"):
        GenerationOptions(temperature=0.0, xtc_probability=0.5, top_a=0.1)


# -- through the loaders ----------------------------------------------------------------------------------
SAMPLED = {"temperature": 1.0, "max_new_tokens": 12, "seed": 1234}
COMBOS = [
    {"dry_multiplier": 0.8, "presence_penalty": 0.5, "repetition_penalty_range": 8},
    {"xtc_probability": 0.5, "xtc_threshold": 0.05, "top_n_sigma": 1.5},
    {"mirostat_mode": 2, "mirostat_tau": 3.0},
    {"dynamic_temperature": True, "dynatemp_low": 0.5, "dynatemp_high": 1.5, "temperature_last": True,
     "min_p": 0.05},
]


@pytest.fixture(params=["transformers", "llama.cpp"])
def loaded(request, engine):
    model = request.getfixturevalue("tiny_model" if request.param == "transformers" else "tiny_gguf")
    engine.load(model)
    return engine


def test_seeded_samplers_reproduce_in_both_loaders(loaded):
    plain = loaded.generate("Hello there", SAMPLED).text
    differs = 0
    for combo in COMBOS:
        first = loaded.generate("Hello there", {**SAMPLED, **combo})
        again = loaded.generate("Hello there", {**SAMPLED, **combo})
        assert first.text == again.text, combo
        assert first.record.generation_options["dry_multiplier"] == combo.get("dry_multiplier", 0.0)
        differs += first.text != plain
    assert differs >= 2  # the samplers do change the draw


def test_bans_and_bias_steer_greedy_decoding_in_both_loaders(loaded):
    greedy = {"temperature": 0.0, "max_new_tokens": 6}
    first = loaded.generate("Hello there", greedy).token_ids
    banned = loaded.generate("Hello there", {**greedy, "custom_token_bans": f"{first[0]},{first[1]}"}).token_ids
    assert first[0] not in banned and first[1] not in banned
    pushed = loaded.generate("Hello there", {**greedy, "logit_bias": [f"{first[0]}:-1000", f"{first[1]}:-1000"]})
    assert pushed.token_ids == banned  # a bias of -1000 is a ban
    lifted = loaded.generate("Hello there", {**greedy, "logit_bias": [f"{banned[0]}:50"]}).token_ids
    assert lifted[0] == banned[0] and lifted[0] != first[0]


def test_a_sampler_a_loader_lacks_is_refused_and_the_model_stays(engine, tiny_gguf):
    engine.load(tiny_gguf)
    with pytest.raises(OptionError, match=r"^the llama.cpp loader cannot apply --smoothing-factor, --top-a\. Load"):
        engine.generate("Hello", {"top_a": 0.2, "smoothing_factor": 0.3, "max_new_tokens": 2})
    assert engine.generate("Hello", {"max_new_tokens": 2, "dry_multiplier": 0.8}).finish_reason in ("length", "eos")


def test_cfg_with_a_negative_prompt_changes_the_transformers_reply(engine, tiny_model):
    engine.load(tiny_model)
    greedy = {"temperature": 0.0, "max_new_tokens": 8}
    plain = engine.generate("Hello there", greedy).text
    guided = engine.generate("Hello there", {**greedy, "guidance_scale": 3.0, "negative_prompt": "zz qq"}).text
    assert guided != plain


def test_a_sweep_over_a_sampler(engine, tiny_gguf):
    engine.load(tiny_gguf)
    table = nbllm.sweep("Hello", {"max_new_tokens": 4, "temperature": 1.0, "seed": 3}, engine=engine,
                        progress=False, dry_multiplier=[0.0, 0.8], xtc_probability=[0.0, 1.0])
    assert len(table) == 4 and set(table["dry_multiplier"]) == {0.0, 0.8}
    again = nbllm.sweep("Hello", {"max_new_tokens": 4, "temperature": 1.0, "seed": 3}, engine=engine,
                        progress=False, dry_multiplier=[0.0, 0.8], xtc_probability=[0.0, 1.0])
    assert list(table["text"]) == list(again["text"])


# -- servers ----------------------------------------------------------------------------------------------
def test_each_server_dialect_gets_the_fields_it_reads():
    from nbllm.loaders.openai import SERVERS, OpenAILoader

    opts = GenerationOptions(dry_multiplier=0.8, xtc_probability=0.3, presence_penalty=0.2,
                             dynamic_temperature=True, dynatemp_low=0.5, dynatemp_high=1.5, logit_bias=["7:-2"])
    fields = server_sampler_fields("llama.cpp", opts)
    assert fields["dry_multiplier"] == 0.8 and fields["dry_sequence_breakers"] == ["\n", ":", '"', "*"]
    assert fields["xtc_probability"] == 0.3 and fields["dynatemp_range"] == 0.5 and fields["temperature"] == 1.0
    assert fields["logit_bias"] == [[7, -2.0]] and fields["presence_penalty"] == 0.2
    tgw = server_sampler_fields("text-generation-webui", opts)
    assert tgw["dry_base"] == 1.75 and tgw["dynatemp_low"] == 0.5 and tgw["logit_bias"] == {7: -2.0}
    loader = OpenAILoader()
    loader.kind = SERVERS["vllm"]
    with pytest.raises(OptionError, match=r"the openai loader cannot apply --dry-multiplier, --xtc-probability, "
                                          r"--dynamic-temperature\. Serve the model from text-generation-webui or llama.cpp's server \(vLLM does not "):
        refuse_samplers(loader, opts)
    refuse_samplers(loader, GenerationOptions(presence_penalty=0.2, logit_bias=["7:-2"]))  # vLLM reads these


def test_serve_takes_llama_cpp_servers_sampler_fields():
    from nbllm.serve_requests import generation_options, parse_request

    raw = (b'{"prompt": "hi", "temperature": 1.0, "dry_multiplier": 0.8, "dry_sequence_breakers": ["\\n", "*"], '
           b'"xtc_probability": 0.2, "mirostat": 2, "dynatemp_range": 0.5, "repeat_last_n": -1, '
           b'"presence_penalty": 0.3, "logit_bias": {"5": -3}, "ignore_eos": true}')
    opts = generation_options(parse_request(raw, chat=False), GenerationOptions())
    assert (opts.dry_multiplier, opts.sequence_breakers, opts.xtc_probability, opts.mirostat_mode) == \
        (0.8, ["\n", "*"], 0.2, 2)
    assert (opts.dynamic_temperature, opts.dynatemp_low, opts.dynatemp_high) == (True, 0.5, 1.5)
    assert opts.repetition_penalty_range == 0 and opts.presence_penalty == 0.3
    assert opts.logit_biases == {5: -3.0} and opts.ban_eos_token


def test_warnings_stay_quiet_for_defaults():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        GenerationOptions(temperature=0.0)


# -- presets in text-generation-webui's format -------------------------------------------------------------
@pytest.fixture
def user_data(tmp_path):
    from nbllm.models import set_models_dir

    (tmp_path / "user_data" / "models").mkdir(parents=True)
    (tmp_path / "user_data" / "presets").mkdir()
    set_models_dir(tmp_path / "user_data" / "models")
    yield tmp_path / "user_data"
    set_models_dir(None)


def test_builtin_presets_are_yaml_files_in_text_generation_webuis_format():
    import yaml

    from nbllm.presets import BUILTIN_DIR

    for name, values in GenerationOptions.presets().items():
        assert yaml.safe_load((BUILTIN_DIR / f"{name}.yaml").read_text()) == values


def test_a_users_text_generation_webui_preset_works(user_data):
    (user_data / "presets" / "Wild DRY.yaml").write_text(
        "temperature: 1.3\nmin_p: 0.05\ndry_multiplier: 0.8\ndry_sequence_breakers: '\"\\n\", \":\"'\n"
        "xtc_probability: 0.5\nsampler_priority: |-\n  dry\n  tfs\n  min_p\n  temperature\n"
        "tfs: 1\nencoder_repetition_penalty: 1\n")
    assert "Wild DRY" in GenerationOptions.presets()
    base = GenerationOptions(max_new_tokens=33, top_k=40, seed=9)
    opts = GenerationOptions.preset("Wild DRY", base, xtc_probability=0.2)
    assert (opts.temperature, opts.min_p, opts.dry_multiplier, opts.xtc_probability) == (1.3, 0.05, 0.8, 0.2)
    assert opts.sequence_breakers == ["\n", ":"] and opts.sampler_priority == ("dry", "min_p", "temperature")
    assert (opts.top_k, opts.top_p) == (0, 1.0)  # what the file does not name is neutral, as in text-generation-webui
    assert (opts.max_new_tokens, opts.seed) == (33, 9)  # never touched by a preset


def test_preset_round_trip_and_bad_files(user_data):
    from nbllm.presets import read_preset, save_preset

    opts = GenerationOptions(temperature=0.9, dry_multiplier=0.8, logit_bias=["5:-2"], sampler_priority=["min_p"],
                             mirostat_mode=2)
    path = save_preset("mine", opts)
    assert path == user_data / "presets" / "mine.yaml"
    again = GenerationOptions.preset("mine")
    assert {n: getattr(again, n) for n in opts.changed()} == opts.changed()
    (user_data / "presets" / "typo.yaml").write_text("temprature: 0.5\n")
    with pytest.raises(OptionError, match=r"^preset typo.yaml has an unknown option 'temprature'\. Remove it"):
        read_preset(user_data / "presets" / "typo.yaml")
    (user_data / "presets" / "tfs.yaml").write_text("tfs: 0.9\npenalty_alpha: 0.6\ntop_k: 4\n")
    with pytest.warns(NbllmWarning, match="preset tfs: nbllm has no tfs, penalty_alpha; left out"):
        assert read_preset(user_data / "presets" / "tfs.yaml") == {"top_k": 4}
    (user_data / "presets" / "hot.yaml").write_text("temperature: 50\n")
    with pytest.raises(OptionError, match=r"^preset hot.yaml: --temperature 50"):
        read_preset(user_data / "presets" / "hot.yaml")
    (user_data / "presets" / "greedy.yaml").write_text("do_sample: false\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # greedy: the samplers it ignores stay where they do not warn
        assert GenerationOptions.preset("greedy").greedy


def test_a_broken_user_preset_is_left_out_of_the_list_and_refused_by_name(user_data):
    (user_data / "presets" / "broken.yaml").write_text("temperature: [\n")
    with pytest.warns(NbllmWarning, match=r"preset broken.yaml cannot be read .*\(left out of the presets\)"):
        assert list(GenerationOptions.presets()) == ["deterministic", "balanced", "creative"]
    with pytest.raises(OptionError, match=r"^preset broken.yaml cannot be read"):
        GenerationOptions.preset("broken")
