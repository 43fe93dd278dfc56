"""Feature trees (saex.analysis.tree, `saex tree`): the masked cosine against a brute-force loop, threshold and
best parent on a hand-computed case, Matryoshka prefixes, the toy-model recovery count, and the command end to
end on a toy hierarchy trained at two widths (the true parent of most children recovered)."""

import json
import math

import pytest
import torch

from saex.analysis import tree
from saex.cli import main
from saex.sae.arch.matryoshka import prefix_ends
from saex.sae.code import Code
from saex.sae.config import SAEConfig


def _brute(A, B):
    """(cos, score) [S_a, S_b] by a loop over pairs, in float64, straight from the definition."""
    S_a, S_b = A.shape[1], B.shape[1]
    cos, score = torch.zeros(S_a, S_b, dtype=torch.float64), torch.zeros(S_a, S_b, dtype=torch.float64)
    A, B = A.double().clamp_min(0), B.double().clamp_min(0)
    for a in range(S_a):
        for b in range(S_b):
            rows = B[:, b] > 0
            x, y = A[rows, a], B[rows, b]
            if x.norm() > 0:
                cos[a, b] = x @ y / (x.norm() * y.norm())
                score[a, b] = cos[a, b] * B[:, b].max() / A[:, a].max()
    return cos, score


def _random_code(N, S, k, g, p_zero=0.3):
    """A Code of k entries per row (distinct latents), some zero, and its dense form."""
    idx = torch.stack([torch.randperm(S, generator=g)[:k] for _ in range(N)])
    val = torch.rand(N, k, generator=g) * 3
    val[torch.rand(N, k, generator=g) < p_zero] = 0
    code = Code(val, idx, S)
    return code, code.dense()


def test_masked_cosine_matches_a_brute_force_loop():
    g = torch.Generator().manual_seed(0)
    ca, A = _random_code(300, 9, 3, g)
    cb, B = _random_code(300, 14, 4, g)
    B[:, 13] = 0  # a dead child
    cb = Code.from_dense(B)
    want_cos, want_score = _brute(A, B)
    for a, b in ((ca, cb), (A, B), (ca, B)):  # Codes, dense, and mixed
        cos, score = tree.masked_scores(a, b)
        torch.testing.assert_close(cos.double(), want_cos, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(score.double(), want_score, atol=1e-5, rtol=1e-5)
    # chunked over children and over entries (tiny cells and pairs), the edges are the dense ones
    thr = float(want_score[want_score > 0].median())
    masked = torch.where(want_score > thr, want_score, -1.0)
    want_best = torch.where(masked.max(0).values > thr, masked.argmax(0), -1)
    for cells, pairs in ((20, 5), (30, 7), (50, 100), (10**6, 10**6)):  # 1, 2, 33 and all entries at a time
        e = tree.tree_edges(ca, cb, thr, cells=cells, pairs=pairs)
        got = sorted(zip(e.parent_E.tolist(), e.child_E.tolist()))
        assert got == sorted(map(tuple, (want_score > thr).nonzero().tolist())) and got, (cells, pairs)
        assert e.best_parent_S.tolist() == want_best.tolist(), (cells, pairs)
        torch.testing.assert_close(e.score_E.double(), want_score[e.parent_E, e.child_E], atol=1e-5, rtol=1e-5)
        assert e.fires_S.tolist() == (B > 0).sum(0).tolist()


# rows 0..3; A's latents a0, a1; B's b0..b3 (b3 never fires)
A_HAND = torch.tensor([[1.0, 0.0], [1.0, 2.0], [0.0, 2.0], [0.0, 0.0]])
B_HAND = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 0.0, 2.0, 0.0], [0.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
# by hand: b0 fires on rows 0, 1: a0 = (1, 1) vs (1, 1): cos 1, score 1 * 1/1; a1 = (0, 2): cos 1/sqrt 2, x 1/2
#          b1 on row 2: a0 = (0): cos 0; a1 = (2): cos 1, score 1 * 1/2
#          b2 on rows 1, 2 with (2, 1): a0 = (1, 0): cos 2/sqrt 5, score x 2/1; a1 = (2, 2): cos 6/sqrt 40, x 2/2
HAND_SCORE = torch.tensor([[1.0, 0.0, 2 * 2 / math.sqrt(5), 0.0], [0.5 / math.sqrt(2), 0.5, 6 / math.sqrt(40), 0.0]])


def test_threshold_and_best_parent_on_a_hand_built_case():
    _, score = tree.masked_scores(A_HAND, B_HAND)
    torch.testing.assert_close(score, HAND_SCORE)
    e = tree.tree_edges(A_HAND, B_HAND)  # threshold 0.6
    assert e.threshold == 0.6
    assert sorted(zip(e.parent_E.tolist(), e.child_E.tolist())) == [(0, 0), (0, 2), (1, 2)]
    # b2's best parent is a0 (score 1.79) though a1's cosine (0.95) beats a0's (0.89): the max ratio decides
    assert e.best_parent_S.tolist() == [0, -1, 0, -1]
    assert tree.tree_edges(A_HAND, B_HAND, threshold=0.4).best_parent_S.tolist() == [0, 1, 0, -1]
    assert tree.tree_edges(A_HAND, B_HAND, threshold=1.5).best_parent_S.tolist() == [-1, -1, 0, -1]
    with pytest.raises(ValueError, match="same rows"):
        tree.tree_edges(A_HAND[:3], B_HAND)


def test_matryoshka_prefixes_link_later_groups_to_earlier_ones():
    # ends (1, 2, 4): group 0 = {0}, group 1 = {1}, group 2 = {2, 3}; latent 3 copies latent 2 (same group: no link)
    acts = torch.tensor([[2.0, 1.0, 0.0, 0.0], [2.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]])
    assert tree.prefix_parent_ends([1, 2, 4]).tolist() == [0, 1, 2, 2]
    e = tree.matryoshka_edges(acts, [1, 2, 4], threshold=0.4)
    _, score = _brute(acts, acts)
    allowed = torch.arange(4)[:, None] < torch.tensor([0, 1, 2, 2])[None, :]  # parent a < child's group start
    want = (score > 0.4) & allowed
    assert sorted(zip(e.parent_E.tolist(), e.child_E.tolist())) == sorted(map(tuple, want.nonzero().tolist()))
    # 1 <- 0 scores 3 / sqrt 10 x 1/2 = 0.47; 2 <- 0 and 3 <- 0 only 1 / sqrt 2 x 1/2 = 0.35
    assert e.best_parent_S.tolist() == [-1, 0, -1, -1]
    assert score[0, 1] == pytest.approx(3 / math.sqrt(10) / 2) and score[0, 2] == pytest.approx(0.5 / math.sqrt(2))
    assert score[2, 3] > 0.9  # the excluded same-group pair would have scored
    with pytest.raises(ValueError, match="rise strictly"):
        tree.matryoshka_edges(acts, [2, 2, 4])
    # the levels come from the SAE's config, the ends its training used
    cfg = SAEConfig(d_in=8, d_sae=256, architecture="topk", k=4, matryoshka="fixed")
    ends = prefix_ends(cfg, 256, None)
    assert ends == [16, 32, 64, 128, 256]
    assert tree.group_ranges(ends) == [(0, 16), (16, 32), (32, 64), (64, 128), (128, 256)]


def test_parent_recovery_counts_children_whose_best_parent_is_the_true_one():
    parent_F = torch.tensor([-1, -1, 0, 0, 1, -1])  # features 2, 3 under 0; 4 under 1; 5 free
    latent_A = torch.tensor([7, 3, -1, 5, -1, -1])  # A recovers 0 (latent 7), 1 (latent 3), 3 (latent 5)
    feature_B = torch.tensor([2, 3, 4, 0, -1, 5])  # B's latents 0..5
    best = torch.tensor([7, 5, 0, 7, 1, -1])
    r = tree.parent_recovery(best, feature_B, latent_A, parent_F)
    # eligible: b0 (f2, parent latent 7: hit), b2 (f4, parent latent 3: best 0, miss); b1's f3 is in A itself
    assert r == {"children": 2, "true_parent": 1, "fraction": 0.5, "same_feature": 2, "same_feature_hits": 2}


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """The small toy preset (a hierarchy: 12 roots of 4 children), 32k rows, two TopK widths in one pass."""
    run = tmp_path_factory.mktemp("tree_toy")
    assert main(["toy", "--run", str(run), "--rows", "32768"]) == 0
    assert main(["train", "--run", str(run), "--architecture", "topk", "--k", "5", "--sweep", "d_sae=32,256",
                 "--steps", "300", "--lr", "4e-3"]) == 0
    return run


def test_the_tree_of_a_toy_hierarchy_recovers_most_true_parents(toy_run, capsys):
    # named wide first: levels are ordered by width
    assert main(["tree", "--run", str(toy_run), "--saes", "topk-d_sae256,topk-d_sae32", "--rows", "16384"]) == 0
    path = toy_run / "trees" / "topk-d_sae32+topk-d_sae256.json"
    t = json.loads(path.read_text())
    assert [(lv["sae"], lv["width"]) for lv in t["levels"]] == [("topk-d_sae32", 32), ("topk-d_sae256", 256)]
    assert t["rows"] == 16384 and t["store_rows"] == 32768 and t["threshold"] == 0.6 and t["kind"] == "widths"
    nodes = {n["id"]: n for n in t["nodes"]}
    assert all(e["score"] > 0.6 and e["parent"] in nodes and e["child"] in nodes for e in t["edges"])
    assert all(nodes[e["parent"]]["level"] == 0 and nodes[e["child"]]["level"] == 1 for e in t["edges"])
    for child, parent in t["best_parent"].items():  # the best parent is the child's highest-scoring edge
        mine = [e for e in t["edges"] if e["child"] == child]
        assert parent == max(mine, key=lambda e: e["score"])["parent"]
    toy = t["toy"]
    assert toy["children"] >= 8, toy  # enough children whose parent the narrow SAE holds to judge by
    assert toy["fraction"] > 0.5, toy
    # recomputed from the nodes' matched features over every child (a superset of the counted ones: those whose
    # own feature the narrow SAE also holds are left out of the count)
    hits = sum(1 for c, p in t["best_parent"].items() if nodes[c].get("true_parent_feature") is not None
               and nodes[p].get("feature") == nodes[c]["true_parent_feature"])
    assert hits >= toy["true_parent"]
    assert "children's best parent is their true parent" in capsys.readouterr().out
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # written atomically: no temp left


def test_bad_requests_say_what_is_wrong(toy_run, capsys):
    from saex.sae.io import save_sae
    from saex.sae.model import SAE

    run = str(toy_run)
    save_sae(SAE(SAEConfig(d_in=16, d_sae=8, k=2)), toy_run / "saes" / "narrow-d16", {"hook": "toy"})
    save_sae(SAE(SAEConfig(d_in=64, d_sae=8, k=2)), toy_run / "saes" / "other-hook", {"hook": "elsewhere"})
    cases = [(["--saes", "topk-d_sae32"], "names one SAE"),
             (["--saes", "topk-d_sae32,nope"], "no SAE named ['nope']"),
             (["--saes", "topk-d_sae32,narrow-d16"], "differ in d_in"),
             (["--saes", "topk-d_sae32,other-hook"], "differ in hook"),
             (["--sae", "topk-d_sae32"], "not a Matryoshka SAE"),
             ([], "one of the two"),
             (["--saes", "topk-d_sae32,topk-d_sae32"], "twice")]
    for args, words in cases:
        assert main(["tree", "--run", run, *args]) == 2, args
        assert words in capsys.readouterr().err, args
