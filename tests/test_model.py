"""Invariants of the model and the generation contract (left padding, the KV cache, sampling)."""

import math

import pytest
import torch

from nanoalign.generate import (entropy_from_logits, generate, last_true, logprobs_from_logits,
                                fit_prompt, pad_left, response_logprobs, sample_next)
from nanoalign.model import GPT, GPTConfig, gpt2_from_state_dict, load_gpt2, positions_and_mask

from grading import close

V, PAD, END = 61, 0, 60


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=V, block_size=48, n_layer=2, n_head=2, n_embd=32)
    cfg.update(kw)
    return GPT(GPTConfig(**cfg)).eval()


def test_causal_mask_future_token_does_not_change_past_logits():
    m = tiny_model()
    x = torch.randint(1, V, (2, 20))
    y = x.clone()
    y[:, 12] = (y[:, 12] % (V - 2)) + 1
    a, b = m(x), m(y)
    assert torch.allclose(a[:, :12], b[:, :12], atol=1e-6)
    assert not torch.allclose(a[:, 12:], b[:, 12:], atol=1e-4)


def test_left_padding_gives_the_logits_of_the_unpadded_prompt():
    m = tiny_model()
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]
    tokens, mask = pad_left(prompts, PAD)
    batched = m(tokens, pad_mask=mask)
    # pad queries attend to themselves: no all-masked row, no NaN
    assert torch.isfinite(batched).all()
    for i, p in enumerate(prompts):
        alone = m(torch.tensor([p]))
        assert torch.allclose(batched[i, -len(p):], alone[0], atol=1e-5)


def test_right_padding_does_not_change_logits_of_real_tokens():
    m = tiny_model()
    x = torch.randint(1, V, (1, 10))
    padded = torch.cat([x, torch.full((1, 5), PAD)], 1)
    mask = torch.cat([torch.ones(1, 10, dtype=torch.bool), torch.zeros(1, 5, dtype=torch.bool)], 1)
    assert torch.allclose(m(padded, pad_mask=mask)[:, :10], m(x), atol=1e-5)


def test_right_padded_batch_needs_no_attention_mask():
    """SFT, RM and DPO pass right-padded batches without pad_mask (the fused causal kernel): the
    real tokens' logits, scalars and the gradients of a loss over them must equal those of the
    masked forward."""
    m = tiny_model().train()
    m.add_scalar_head("reward")
    lengths = [20, 7, 13, 1]
    tokens = torch.randint(1, V, (4, 20))
    mask = torch.arange(20)[None] < torch.tensor(lengths)[:, None]
    tokens = tokens.masked_fill(~mask, PAD)

    def forward_and_grads(pad_mask):
        m.zero_grad()
        logits, scalar = m(tokens, pad_mask=pad_mask, output="both")
        (logprobs_from_logits(logits, tokens)[mask].sum() + scalar[mask].sum()).backward()
        return logits[mask], scalar[mask], [p.grad.clone() for p in m.parameters()]

    with_mask, without = forward_and_grads(mask), forward_and_grads(None)
    assert (torch.allclose(with_mask[0], without[0], atol=1e-5)
            and torch.allclose(with_mask[1], without[1], atol=1e-5))
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(with_mask[2], without[2]))
    tokens[1, 7:] = (tokens[1, 7:] + 1) % V  # what sits in the pad slots never reaches a real token
    assert torch.allclose(forward_and_grads(None)[0], without[0], atol=1e-5)
    # left padding is another matter: there the mask is needed
    tokens, mask = tokens.flip(1), mask.flip(1)
    assert not torch.allclose(forward_and_grads(mask)[0], forward_and_grads(None)[0], atol=1e-3)


def test_heavily_left_padded_batch_has_finite_logits_and_gradients():
    m = tiny_model()
    m.train()
    tokens, mask = pad_left([[3], [4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]], PAD)
    logits = m(tokens, pad_mask=mask)
    logits.sum().backward()
    assert torch.isfinite(logits).all()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)


def test_positions_start_at_zero_after_left_padding():
    mask = torch.tensor([[False, False, True, True], [True, True, True, True]])
    pos, attn = positions_and_mask(mask, 4, 0)
    assert pos.tolist() == [[0, 0, 0, 1], [0, 1, 2, 3]]
    assert attn.shape == (2, 1, 4, 4)
    assert attn[0, 0].any(-1).all()  # no empty row
    assert not attn[0, 0, 3, :2].any()  # a real query never sees pads


def test_row_logprobs_do_not_depend_on_other_rows_in_the_batch():
    m = tiny_model()
    a = [4, 5, 6, 7]
    t1, m1 = pad_left([a, [8, 9]], PAD)
    t2, m2 = pad_left([a, [10, 11, 12, 13, 14, 15, 16]], PAD)
    l1 = m(t1, pad_mask=m1)[0, -4:]
    l2 = m(t2, pad_mask=m2)[0, -4:]
    assert torch.allclose(l1, l2, atol=1e-5)


def test_greedy_generation_with_kv_cache_equals_recomputing_the_prefix():
    m = tiny_model()
    prompts = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11]]
    a = generate(m, prompts, 25, END, PAD, temperature=0)
    b = generate(m, prompts, 25, END, PAD, temperature=0, use_cache=False)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), \
        f"greedy tokens with the KV cache {a[0].tolist()} != without it {b[0].tolist()}"


@pytest.mark.parametrize("step", ["decode", "forward"])
def test_cached_decoding_gives_the_full_forward_logits_at_every_step(step):
    """Token by token through the KV cache, on a left-padded batch: each step's logits are those of
    one forward over the whole sequence so far, by generation's own step (GPT.decode) and by the
    general forward with a cache (an untrained model's greedy output repeats its last token
    whatever the cache holds, so compare logits, not tokens)."""
    from nanoalign.model import KVCache
    m = tiny_model()
    tokens, mask = pad_left([[1, 2, 3, 4, 5], [7, 8]], PAD)
    continuation = torch.randint(1, V - 1, (2, 6))
    full_tokens = torch.cat([tokens, continuation], 1)
    full_mask = torch.cat([mask, torch.ones_like(continuation, dtype=torch.bool)], 1)
    full = m(full_tokens, pad_mask=full_mask)
    cache = KVCache(m, 2, full_tokens.size(1))
    P = tokens.size(1)
    logits = m(tokens, pad_mask=mask, cache=cache)[:, -1]
    close(logits, full[:, P - 1], "the prompt's forward through an empty cache gives the full "
          "forward's logits", atol=1e-5)
    for t in range(continuation.size(1)):
        if step == "decode":
            logits = m.decode(continuation[:, t], cache)
        else:
            mask_so_far = full_mask[:, :P + t + 1]
            logits = m(continuation[:, t:t + 1], pad_mask=mask_so_far, cache=cache)[:, -1]
        close(logits, full[:, P + t], f"{step} step {t}: the new token attends to every cached "
              f"key and value (slots 0..{P + t}) and gives the full forward's logits", atol=1e-5)


def test_batched_greedy_equals_one_prompt_at_a_time():
    m = tiny_model()
    prompts = [[1, 2, 3, 4, 5, 6], [7, 8], [9, 10, 11]]
    tokens, mask, P = generate(m, prompts, 15, END, PAD, temperature=0)
    for i, p in enumerate(prompts):
        t, _, p_len = generate(m, [p], 15, END, PAD, temperature=0)
        n = t.size(1) - p_len
        assert tokens[i, P:P + n].tolist() == t[0, p_len:].tolist()


def test_sampled_tokens_logprobs_match_full_forward_at_the_sampling_temperature():
    m = tiny_model()
    g = torch.Generator().manual_seed(0)
    tokens, mask, P = generate(m, [[1, 2, 3], [4, 5, 6, 7, 8]], 12, END, PAD, temperature=0.7,
                               generator=g)
    logits = m(tokens, pad_mask=mask)
    lp = response_logprobs(logits, tokens, P, temperature=0.7)
    assert lp.shape == (2, tokens.size(1) - P)
    assert torch.isfinite(lp).all()
    # the same via the cached path, one step at a time
    from nanoalign.model import KVCache
    cache = KVCache(m, 2, tokens.size(1))
    inc = [m(tokens[:, :P], pad_mask=mask[:, :P], cache=cache)[:, -1:]]
    for t in range(P, tokens.size(1) - 1):
        inc.append(m.decode(tokens[:, t], cache)[:, None])
    lp_inc = logprobs_from_logits(torch.cat(inc, 1) / 0.7, tokens[:, P:])
    real = mask[:, P:]
    assert torch.allclose(lp[real], lp_inc[real], atol=1e-5)


def test_sampled_continuations_follow_the_full_forward_distribution():
    """generate's second new token comes from the cached decoding step: over many rows, its
    frequencies are those of the full forward's distribution at the sampling temperature, summed
    over the first token (chi-square; a model with large weights, so that positions, the cache and
    the prompt's pads all change the distribution)."""
    m = tiny_model(seed=4)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    prompt, n, temp = [5, 9, 2], 6000, 0.7
    g = torch.Generator().manual_seed(0)
    tokens, _, P = generate(m, [prompt] * (n - 1) + [[7] * 6], 2, END, PAD, temp, generator=g)
    counts = torch.bincount(tokens[:-1, P + 1], minlength=V).double()  # the second new tokens
    # exactly: p(second = j) = sum_f p(f) p(j | f), from the prompt + every first token f
    with torch.no_grad():
        first = (m(torch.tensor([prompt]))[0, -1] / temp).double().softmax(-1)  # (V,)
        seqs = torch.cat([torch.tensor([prompt]).expand(V, -1), torch.arange(V)[:, None]], 1)
        second = (m(seqs)[:, -1] / temp).double().softmax(-1)  # (V, V): row f is p(. | f)
    expected = (n - 1) * (first[:, None] * second).sum(0)
    keep = expected > 5  # chi-square's rule of thumb
    chi2 = ((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum().item()
    dof = keep.sum().item() - 1
    assert chi2 < dof + 5 * math.sqrt(2 * dof), (chi2, dof)


def test_after_the_end_token_every_token_is_pad_and_masked():
    m = tiny_model()
    with torch.no_grad():  # make END very likely so rows finish at different steps
        m.lm_head.weight[END] += 0.3 * m.lm_head.weight.mean(0)
    g = torch.Generator().manual_seed(1)
    tokens, mask, P = generate(m, [[1, 2], [3, 4, 5]] * 4, 30, END, PAD, temperature=1.0,
                               generator=g)
    for row, mrow in zip(tokens[:, P:], mask[:, P:]):
        ends = (row == END).nonzero()
        if len(ends):
            e = ends[0].item()
            assert (row[e + 1:] == PAD).all() and not mrow[e + 1:].any() and mrow[:e + 1].all()


def test_sampling_with_fixed_generator_is_reproducible_and_zero_temperature_is_argmax():
    logits = torch.randn(4, V)
    a = sample_next(logits, 1.0, generator=torch.Generator().manual_seed(3))
    b = sample_next(logits, 1.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert torch.equal(sample_next(logits, 0), logits.argmax(-1))


def test_pure_sampling_matches_softmax_at_temperature():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    T, n = 0.8, 40000
    draws = sample_next(logits.expand(n, 4), T, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=4).float() / n
    p = (logits[0] / T).softmax(-1)
    chi2 = (n * (freq - p) ** 2 / p).sum().item()
    assert chi2 < 16.27  # 3 degrees of freedom, p = 0.001


def test_a_long_prompt_keeps_its_opening_token_and_its_most_recent_tokens():
    ids = [900] + list(range(20))  # 900 stands for <|user|>
    assert fit_prompt(ids, 30) == ids
    assert fit_prompt(ids, 6) == [900, 15, 16, 17, 18, 19]


def test_sampling_keeps_tiny_probabilities_and_never_draws_an_impossible_token():
    """The sampler inverts the cumulative distribution: a token of probability 1e-3 among 1,000
    must keep its share, and a token of probability 0 (here the last ones, which an fp32 running
    sum or a u of exactly 1 would reach) must never be drawn."""
    V_big, n, chunk = 1000, 60_000, 5000
    logits = torch.zeros(1, V_big)
    logits[0, 123] = math.log(1e-3 * (V_big - 3) / (1 - 1e-3))  # p(123) = 1e-3 exactly
    logits[0, -2:] = float("-inf")
    g = torch.Generator().manual_seed(0)
    draws = torch.cat([sample_next(logits.expand(chunk, V_big), 1.0, generator=g)
                       for _ in range(n // chunk)])
    assert draws.max() < V_big - 2
    hits = (draws == 123).sum().item()
    assert abs(hits - 60) < 4 * math.sqrt(60), hits  # Poisson(60): within 4 standard deviations
    # the bulk: counts spread as multinomial counts do (chi-square with V - 3 degrees of freedom)
    counts = torch.bincount(draws, minlength=V_big)[:V_big - 2].double()
    p = logits[0, :V_big - 2].double().softmax(-1)
    chi2 = ((counts - n * p) ** 2 / (n * p)).sum().item()
    assert abs(chi2 - (V_big - 3)) < 5 * math.sqrt(2 * (V_big - 3)), chi2


def test_top_k_and_top_p_only_sample_allowed_tokens():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -5.0]]).expand(2000, 5)
    assert sample_next(logits, 1.0, top_k=2, generator=torch.Generator().manual_seed(0)).max() <= 1
    p = torch.tensor([3.0, 2.0, 1.0, 0.0, -5.0]).softmax(-1)
    assert p[0] < 0.7 < p[0] + p[1]
    assert sample_next(logits, 1.0, top_p=0.7,
                       generator=torch.Generator().manual_seed(0)).max() <= 1


def test_logprob_and_entropy_helpers():
    logits = torch.randn(2, 5, V)
    labels = torch.randint(0, V, (2, 5))
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(),
                                           reduction="none").view(2, 5)
    assert torch.allclose(logprobs_from_logits(logits, labels), -ce, atol=1e-6)
    assert torch.allclose(entropy_from_logits(torch.zeros(1, 1, V)), torch.tensor(math.log(V)),
                          atol=1e-5)
    assert entropy_from_logits(torch.tensor([[[100.0] + [0.0] * (V - 1)]])).item() < 1e-6
    flags = torch.tensor([[False, True, True, False], [True, False, False, False]])
    assert last_true(flags).tolist() == [2, 0]


def test_scalar_head_reward_init_and_zero_init():
    m = tiny_model().add_scalar_head("zero")
    x = torch.randint(1, V, (2, 7))
    assert torch.equal(m(x, output="scalar"), torch.zeros(2, 7))
    m.add_scalar_head("reward")
    logits, values = m(x, output="both")
    assert logits.shape == (2, 7, V) and values.shape == (2, 7)
    assert abs(m.scalar_head.weight.std().item() - 1 / math.sqrt(33)) < 0.06


def fake_hf_gpt2_state_dict(model: GPT, prefix="transformer.", with_buffers=True):
    """Our weights written in Hugging Face GPT-2's key names and Conv1D (in, out) layout."""
    sd = {}
    for k, v in model.state_dict().items():
        if k == "lm_head.weight":
            continue
        hf = prefix + k.removeprefix("transformer.")
        if k.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            v = v.t().contiguous()
        sd[hf] = v.clone()
    if with_buffers:
        for i in range(model.config.n_layer):
            sd[f"{prefix}h.{i}.attn.bias"] = torch.ones(1, 1, 8, 8)
            sd[f"{prefix}h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    return sd


@pytest.mark.parametrize("prefix", ["transformer.", ""])
def test_gpt2_import_maps_hf_names_and_transposes_conv1d(prefix):
    src = tiny_model(seed=3, n_embd=64, n_head=4, gelu="tanh")
    sd = fake_hf_gpt2_state_dict(src, prefix)
    assert sd[f"{prefix}h.0.attn.c_attn.weight"].shape == (64, 192)  # Conv1D stores (in, out)
    dst = gpt2_from_state_dict(sd, n_head=4)
    x = torch.randint(1, V, (2, 9))
    # GPT-2's "gelu_new": its weights were trained with the tanh approximation
    assert dst.config.gelu == "tanh"
    assert torch.allclose(src(x), dst.eval()(x), atol=1e-6)
    exact = tiny_model(seed=3, n_embd=64, n_head=4, gelu="none")
    # the two GELUs differ: the setting is not a no-op
    assert not torch.allclose(exact(x), src(x), atol=1e-6)


def test_gpt2_bin_and_safetensors_give_identical_logits(tmp_path):
    src = tiny_model(seed=4)
    sd = fake_hf_gpt2_state_dict(src, with_buffers=False)
    torch.save(sd, tmp_path / "pytorch_model.bin")
    write_safetensors(sd, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text('{"n_head": 2}')
    a = load_gpt2(str(tmp_path / "pytorch_model.bin"), n_head=2)
    # a directory: model.safetensors is preferred, config.json gives n_head
    b = load_gpt2(str(tmp_path))
    x = torch.randint(1, V, (1, 11))
    assert torch.equal(a.eval()(x), b.eval()(x))


def write_safetensors(sd, path):
    import json
    header, blobs, offset = {}, [], 0
    for k, v in sd.items():
        b = v.contiguous().numpy().tobytes()
        header[k] = {"dtype": "F32", "shape": list(v.shape),
                     "data_offsets": [offset, offset + len(b)]}
        blobs.append(b)
        offset += len(b)
    h = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(len(h).to_bytes(8, "little") + h + b"".join(blobs))


def test_flops_per_token_counts_six_n_plus_attention():
    m = tiny_model()
    n = m.num_params()
    assert m.flops_per_token(48) == 6 * n + 12 * 2 * 32 * 48


def test_growing_the_vocabulary_keeps_old_logits_and_starts_new_rows_at_the_mean():
    from nanoalign.model import grow_vocab
    m = tiny_model(seed=5)
    x = torch.randint(1, V, (2, 9))
    before = m(x)
    old = m.lm_head.weight.detach().clone()
    grow_vocab(m, V + 4)
    after = m(x)
    assert after.shape[-1] == V + 4 and m.config.vocab_size == V + 4
    assert torch.allclose(after[..., :V], before, atol=1e-6)  # old tokens keep their logits
    assert torch.allclose(m.transformer.wte.weight[V:], old.mean(0).expand(4, -1))
    assert m.transformer.wte.weight is m.lm_head.weight  # still tied
    m(torch.tensor([[1, V + 3]])).sum().backward()  # the new rows are usable and trainable
    assert m.lm_head.weight.grad[V + 3].abs().sum() > 0
