"""The EM-routing oracle (fastcaps.reference.em_routing) against a scalar loop written from
the paper's Procedure 1, and against what the mathematics guarantees."""

import importlib
import math

import pytest
import torch

from fastcaps import reference

# The module (fastcaps.reference.em_routing is also the name of its function).
em = importlib.import_module("fastcaps.reference.em_routing")

EPS, FLOOR = 1e-8, 1e-6


@pytest.fixture(autouse=True)
def float64_by_default():
    """The oracle is proven in float64; the default dtype is restored for the other test files."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


def scalar_em(votes, a_in, child_of, beta_u, beta_a, lambdas, windows, children):
    """Procedure 1, one number at a time, in probability space as the paper writes it.

    votes[w][c][j][h] and a_in[w][c]: slot c of window w; child_of[w][c]: which input capsule
    fills it (None: padding, activation 0). A child's R is normalised over every (window,
    parent) it votes for; with one window per child this is the per-window form."""
    parents, entries = len(votes[0][0]), len(votes[0][0][0])
    holders = {}
    for w in range(windows):
        for c in range(children):
            holders.setdefault(child_of[w][c], []).append((w, c))
    R = [[[1.0 / (parents * len(holders[child_of[w][c]])) for _ in range(parents)] for c in range(children)]
         for w in range(windows)]
    for t, lam in enumerate(lambdas):
        mu = [[None] * parents for _ in range(windows)]
        var = [[None] * parents for _ in range(windows)]
        act = [[None] * parents for _ in range(windows)]
        for w in range(windows):
            for j in range(parents):
                r = [R[w][c][j] * a_in[w][c] for c in range(children)]
                r_sum = sum(r)
                denom = torch.clamp(r_sum, min=EPS) if torch.is_tensor(r_sum) else max(r_sum, EPS)
                mu[w][j] = [sum(r[c] * votes[w][c][j][h] for c in range(children)) / denom for h in range(entries)]
                var[w][j] = [sum(r[c] * (votes[w][c][j][h] - mu[w][j][h]) ** 2 for c in range(children)) / denom
                             + FLOOR for h in range(entries)]
                cost = sum((beta_u[j] + torch.log(torch.sqrt(var[w][j][h]))) * r_sum for h in range(entries))
                act[w][j] = torch.sigmoid(lam * (beta_a[j] - cost))
        if t == len(lambdas) - 1:
            return mu, act
        numer = [[None] * children for _ in range(windows)]
        for w in range(windows):
            for c in range(children):
                row = []
                for j in range(parents):
                    norm = 1.0
                    for h in range(entries):
                        norm = norm * 2 * math.pi * var[w][j][h]
                    p = torch.exp(-sum((votes[w][c][j][h] - mu[w][j][h]) ** 2 / (2 * var[w][j][h])
                                       for h in range(entries))) / torch.sqrt(norm)
                    row.append(act[w][j] * p)
                numer[w][c] = row
        for w in range(windows):
            for c in range(children):
                total = sum(numer[v][d][k] for v, d in holders[child_of[w][c]] for k in range(parents))
                R[w][c] = [numer[w][c][j] / total for j in range(parents)]


def assert_same_values_and_gradients(outputs, expected, inputs):
    """Values to 1e-10 and the gradients of every input along a random cotangent to 1e-9."""
    for x, y in zip(outputs, expected):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)
    cotangents = [torch.randn_like(x) for x in outputs]
    grads = torch.autograd.grad(sum((x * c).sum() for x, c in zip(outputs, cotangents)), inputs)
    grads_ref = torch.autograd.grad(sum((y * c).sum() for y, c in zip(expected, cotangents)), inputs)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-11)


def matmul(m, w):
    side = len(m)
    return [[sum(m[a][b] * w[b][d] for b in range(side)) for d in range(side)] for a in range(side)]


def flat(matrix):
    return [x for row in matrix for x in row]


def test_dense_matches_the_paper_loop_values_and_gradients():
    torch.manual_seed(0)
    batch, in_caps, out_caps, side = 2, 5, 3, 2
    poses = torch.randn(batch, in_caps, side, side, requires_grad=True)
    acts = torch.rand(batch, in_caps, requires_grad=True)
    weight = torch.randn(out_caps, in_caps, side, side, requires_grad=True)
    beta_u, beta_a = torch.randn(out_caps, requires_grad=True), torch.randn(out_caps, requires_grad=True)
    lambdas = [0.5, 1.0, 2.0]
    mu, a = reference.em_routing(poses, acts, weight, beta_u, beta_a, 3, lambdas, eps=EPS, variance_floor=FLOOR)
    outs_ref = []
    for b in range(batch):
        votes = [[[flat(matmul(poses[b, i], weight[j, i])) for j in range(out_caps)] for i in range(in_caps)]]
        m, act = scalar_em(votes, [list(acts[b])], [list(range(in_caps))], beta_u, beta_a, lambdas, 1, in_caps)
        outs_ref.append((torch.stack([torch.stack(x) for x in m[0]]), torch.stack(act[0])))
    mu_ref = torch.stack([m for m, _ in outs_ref]).view(batch, out_caps, side, side)
    a_ref = torch.stack([x for _, x in outs_ref])
    assert_same_values_and_gradients((mu, a), (mu_ref, a_ref), (poses, acts, weight, beta_u, beta_a))


def conv_loop_inputs(poses, acts, weight, stride, padding):
    """The windows of a grid as the scalar loop takes them: votes, activations, child ids."""
    batch, in_caps, side, _, height, width = poses.shape
    out_caps, _, kh, kw = weight.shape[:4]
    out_h = (height + 2 * padding - kh) // stride + 1
    out_w = (width + 2 * padding - kw) // stride + 1
    per_sample = []
    zero = torch.zeros(side, side)
    for b in range(batch):
        votes, a_in, child_of = [], [], []
        for y in range(out_h):
            for x in range(out_w):
                wv, wa, wc = [], [], []
                for i in range(in_caps):
                    for p in range(kh):
                        for q in range(kw):
                            yy, xx = y * stride + p - padding, x * stride + q - padding
                            inside = 0 <= yy < height and 0 <= xx < width
                            m = poses[b, i, :, :, yy, xx] if inside else zero
                            wv.append([flat(matmul(m, weight[j, i, p, q])) for j in range(out_caps)])
                            wa.append(acts[b, i, yy, xx] if inside else torch.zeros(()))
                            wc.append((i, yy, xx) if inside else ("pad", y, x, i, p, q))
                votes.append(wv)
                a_in.append(wa)
                child_of.append(wc)
        per_sample.append((votes, a_in, child_of))
    return per_sample, out_h, out_w


@pytest.mark.parametrize("normalization", ["per_window", "per_child"])
@pytest.mark.parametrize("stride,padding,iterations", [(1, 0, 2), (2, 1, 3), (1, 1, 1)])
def test_conv_matches_the_paper_loop(normalization, stride, padding, iterations):
    torch.manual_seed(1)
    batch, in_caps, out_caps, side, height, width, k = 1, 2, 2, 2, 3, 4, 2
    poses = torch.randn(batch, in_caps, side, side, height, width, requires_grad=True)
    acts = torch.rand(batch, in_caps, height, width, requires_grad=True)
    weight = torch.randn(out_caps, in_caps, k, k, side, side, requires_grad=True)
    beta_u, beta_a = torch.randn(out_caps, requires_grad=True), torch.randn(out_caps, requires_grad=True)
    lambdas = [1.0 + t for t in range(iterations)]
    mu, a = reference.conv_em_routing(poses, acts, weight, beta_u, beta_a, iterations, stride, padding,
                                      inverse_temperature=lambdas, normalization=normalization, eps=EPS,
                                      variance_floor=FLOOR)
    per_sample, out_h, out_w = conv_loop_inputs(poses, acts, weight, stride, padding)
    mus, acts_ref = [], []
    for votes, a_in, child_of in per_sample:
        if normalization == "per_window":       # every slot its own child: normalised within its window
            child_of = [[(w, c) for c in range(len(row))] for w, row in enumerate(child_of)]
        m, act = scalar_em(votes, a_in, child_of, beta_u, beta_a, lambdas, len(votes), len(votes[0]))
        mus.append(torch.stack([torch.stack([torch.stack(h) for h in w]) for w in m]))
        acts_ref.append(torch.stack([torch.stack(w) for w in act]))
    mu_ref = torch.stack(mus).view(batch, out_h, out_w, out_caps, side, side).permute(0, 3, 4, 5, 1, 2)
    a_ref = torch.stack(acts_ref).view(batch, out_h, out_w, out_caps).permute(0, 3, 1, 2)
    assert_same_values_and_gradients((mu, a), (mu_ref, a_ref), (poses, acts, weight, beta_u, beta_a))


def conv_inputs(seed, batch=2, in_caps=3, out_caps=4, side=4, height=5, width=6, k=3, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, in_caps, side, side, height, width, generator=g, dtype=dtype),
            torch.rand(batch, in_caps, height, width, generator=g, dtype=dtype),
            torch.randn(out_caps, in_caps, k, k, side, side, generator=g, dtype=dtype) * 0.5,
            torch.randn(out_caps, generator=g, dtype=dtype), torch.randn(out_caps, generator=g, dtype=dtype))


def test_responsibilities_sum_to_one_over_each_childs_parents():
    torch.manual_seed(2)
    batch, in_caps, height, width, kernel, out_caps = 2, 3, 5, 4, (3, 2), 4
    index = em.window_children(in_caps, (height, width), kernel, (1, 2), (1, 0), (1, 1), "cpu")
    count = in_caps * height * width
    logits = torch.randn(batch, index.shape[0], index.shape[1], out_caps) * 5
    log_r = logits - em.child_logsumexp(logits, index, count)
    totals = torch.zeros(batch, count + 1).index_add_(1, index.flatten(), log_r.exp().sum(-1).reshape(batch, -1))
    torch.testing.assert_close(totals[:, :count], torch.ones(batch, count))
    # The first iteration's R: 1 / (J w_i) sums to 1 over the child's parents in every window too.
    windows = torch.bincount(index.flatten(), minlength=count + 1)[:count]
    assert windows.min() >= 1
    # Per window: a softmax over J.
    log_r = logits - em.child_logsumexp(logits, None, 0)
    torch.testing.assert_close(log_r.exp().sum(-1), torch.ones(logits.shape[:-1]))


def test_one_iteration_per_window_mu_is_the_activation_weighted_mean_of_the_votes():
    dense_poses = torch.randn(3, 7, 4, 4)
    dense_acts = torch.rand(3, 7)
    dense_w = torch.randn(5, 7, 4, 4)
    mu, _ = reference.em_routing(dense_poses, dense_acts, dense_w, torch.zeros(5), torch.zeros(5), 1)
    votes = torch.einsum("biac,jicd->bijad", dense_poses, dense_w)
    expected = (dense_acts[:, :, None, None, None] * votes).sum(1) / dense_acts.sum(1)[:, None, None, None]
    torch.testing.assert_close(mu, expected)


def test_a_permutation_of_the_children_leaves_the_output_unchanged():
    g = torch.Generator().manual_seed(4)
    poses, acts = torch.randn(2, 9, 4, 4, generator=g), torch.rand(2, 9, generator=g)
    weight, beta_u, beta_a = torch.randn(3, 9, 4, 4, generator=g), torch.randn(3, generator=g), torch.randn(3, generator=g)
    perm = torch.randperm(9, generator=g)
    out = reference.em_routing(poses, acts, weight, beta_u, beta_a, 3)
    permuted = reference.em_routing(poses[:, perm], acts[:, perm], weight[:, perm], beta_u, beta_a, 3)
    for x, y in zip(out, permuted):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_per_child_equals_per_window_when_windows_do_not_overlap(k):
    poses, acts, weight, beta_u, beta_a = conv_inputs(5, height=6, width=6, k=k)
    outs = [reference.conv_em_routing(poses, acts, weight, beta_u, beta_a, 3, stride=k, normalization=n)
            for n in ("per_child", "per_window")]
    for x, y in zip(*outs):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)
    # ... and differ where they overlap.
    overlap = [reference.conv_em_routing(poses, acts, weight, beta_u, beta_a, 2, stride=1, normalization=n)[1]
               for n in ("per_child", "per_window")]
    if k > 1:
        assert (overlap[0] - overlap[1]).abs().max() > 1e-6


def test_a_whole_grid_window_is_the_dense_layer_with_one_weight_per_offset():
    poses, acts, weight, beta_u, beta_a = conv_inputs(6, height=3, width=3, k=3)
    mu, a = reference.conv_em_routing(poses, acts, weight, beta_u, beta_a, 3, normalization="per_window")
    in_caps = poses.shape[1]
    dense_w = weight.reshape(weight.shape[0], in_caps * 9, 4, 4)
    dense_mu, dense_a = reference.em_routing(poses.permute(0, 1, 4, 5, 2, 3).reshape(2, in_caps * 9, 4, 4),
                                             acts.reshape(2, in_caps * 9), dense_w, beta_u, beta_a, 3)
    torch.testing.assert_close(mu[..., 0, 0], dense_mu)
    torch.testing.assert_close(a[..., 0, 0], dense_a)


def test_class_capsules_share_w_across_positions_and_add_coordinates():
    g = torch.Generator().manual_seed(7)
    poses, acts = torch.randn(2, 3, 4, 4, 2, 3, generator=g), torch.rand(2, 3, 2, 3, generator=g)
    weight, beta_u, beta_a = torch.randn(5, 3, 4, 4, generator=g), torch.randn(5, generator=g), torch.randn(5, generator=g)
    mu, a = reference.em_routing(poses, acts, weight, beta_u, beta_a, 2, coordinate_addition=True)
    votes = torch.einsum("biacyx,jicd->biyxjad", poses, weight).clone()
    for y in range(2):
        for x in range(3):
            votes[:, :, y, x, :, 0, 3] += (y + 0.5) / 2
            votes[:, :, y, x, :, 1, 3] += (x + 0.5) / 3
    mu_v, a_v = reference.em_route_votes(votes.reshape(2, 18, 5, 16), acts.reshape(2, 18), beta_u, beta_a, 2)
    torch.testing.assert_close(mu, mu_v.view(2, 5, 4, 4))
    torch.testing.assert_close(a, a_v)


def test_detach_routing_keeps_values_and_stops_the_gradient_through_earlier_iterations():
    poses, acts, weight, beta_u, beta_a = [t.requires_grad_() for t in conv_inputs(8)]
    live = reference.conv_em_routing(poses, acts, weight, beta_u, beta_a, 3, padding=1)
    detached = reference.conv_em_routing(poses, acts, weight, beta_u, beta_a, 3, padding=1, detach_routing=True)
    for x, y in zip(live, detached):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    g_live = torch.autograd.grad(live[1].sum(), weight)[0]
    g_det = torch.autograd.grad(detached[1].sum(), weight)[0]
    assert (g_live - g_det).abs().max() > 1e-8
    one = reference.conv_em_routing(poses, acts, weight, beta_u, beta_a, 1, padding=1)
    g_one = torch.autograd.grad(one[1].sum(), weight)[0]
    assert g_one.shape == g_det.shape


STRESS = {
    "zero activations": lambda p, a, w: (p, torch.zeros_like(a), w),
    "all-equal votes": lambda p, a, w: (torch.ones_like(p), a, torch.ones_like(w)),
    "votes x 1e6": lambda p, a, w: (p * 1e6, a, w),
    "votes x 1e-6": lambda p, a, w: (p * 1e-6, a, w),
    "one child active": lambda p, a, w: (p, torch.zeros_like(a).index_fill_(1, torch.tensor([0]), 1.0), w),
}


@pytest.mark.parametrize("case", list(STRESS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("normalization", ["per_window", "per_child"])
def test_finite_everywhere(case, dtype, normalization):
    poses, acts, weight, beta_u, beta_a = conv_inputs(9, dtype=dtype)
    poses, acts, weight = STRESS[case](poses, acts, weight)
    inputs = [t.clone().requires_grad_() for t in (poses, acts, weight, beta_u, beta_a)]
    mu, a = reference.conv_em_routing(*inputs, 3, padding=1, normalization=normalization)
    assert torch.isfinite(mu).all() and torch.isfinite(a).all()
    grads = torch.autograd.grad(mu.sum() + a.sum(), inputs)
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_compute_in_float32(dtype):
    poses, acts, weight, beta_u, beta_a = conv_inputs(10, dtype=torch.float32)
    wide = reference.conv_em_routing(poses, acts, weight, beta_u, beta_a, 2, padding=1)
    half = [t.to(dtype) for t in (poses, acts, weight, beta_u, beta_a)]
    narrow = reference.conv_em_routing(*half, 2, padding=1, upcast=True)
    assert narrow[0].dtype == dtype and torch.isfinite(narrow[0]).all() and torch.isfinite(narrow[1]).all()
    again = reference.conv_em_routing(*[t.float() for t in half], 2, padding=1)
    torch.testing.assert_close(narrow[1].float(), again[1].to(dtype).float())
    assert (narrow[1].float() - wide[1]).abs().max() < 0.1


def test_gradcheck_small():
    poses, acts, weight, beta_u, beta_a = [t.requires_grad_() for t in conv_inputs(11, batch=1, in_caps=2,
                                                                                      out_caps=2, side=2, height=3,
                                                                                      width=3, k=2)]

    def f(*args):
        return reference.conv_em_routing(*args, 2, padding=0, inverse_temperature=[1.0, 2.0])

    assert torch.autograd.gradcheck(f, (poses, acts, weight, beta_u, beta_a))


BAD = [
    (dict(iterations=0), ValueError, "iterations"),
    (dict(inverse_temperature=[1.0, 2.0]), ValueError, "inverse_temperature has 2 values"),
    (dict(inverse_temperature=-1.0), ValueError, "inverse_temperature must be positive"),
    (dict(inverse_temperature="x"), TypeError, "inverse_temperature"),
    (dict(normalization="softmax"), ValueError, "normalization"),
    (dict(stride=0), ValueError, "stride"),
    (dict(eps=0.0), ValueError, "eps"),
    (dict(variance_floor=-1.0), ValueError, "variance_floor"),
]


@pytest.mark.parametrize("kwargs,error,match", BAD)
def test_bad_options_name_the_argument(kwargs, error, match):
    poses, acts, weight, beta_u, beta_a = conv_inputs(12)
    call = dict(iterations=3)
    call.update(kwargs)
    with pytest.raises(error, match=match):
        reference.conv_em_routing(poses, acts, weight, beta_u, beta_a, **call)


def test_bad_shapes_name_the_argument():
    poses, acts, weight, beta_u, beta_a = conv_inputs(13)
    with pytest.raises(ValueError, match="poses must have shape"):
        reference.conv_em_routing(poses[0], acts, weight, beta_u, beta_a)
    with pytest.raises(ValueError, match="activations must have shape"):
        reference.conv_em_routing(poses, acts[:, :2], weight, beta_u, beta_a)
    with pytest.raises(ValueError, match="weight must have shape"):
        reference.conv_em_routing(poses, acts, weight[:, :2], beta_u, beta_a)
    with pytest.raises(ValueError, match="beta_a must have shape"):
        reference.conv_em_routing(poses, acts, weight, beta_u, beta_a[:2])
    with pytest.raises(ValueError, match="larger than the padded grid"):
        reference.conv_em_routing(poses[..., :2, :2], acts[..., :2, :2], weight, beta_u, beta_a)
    with pytest.raises(TypeError, match="weight has dtype"):
        reference.conv_em_routing(poses, acts, weight.float(), beta_u, beta_a)
    with pytest.raises(ValueError, match="coordinate_addition needs poses on a grid"):
        reference.em_routing(poses[..., 0, 0], acts[..., 0, 0], weight[:, :, 0, 0], beta_u, beta_a,
                             coordinate_addition=True)
