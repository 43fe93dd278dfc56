"""The explorer's feature trees: /tree draws the tree that `saex tree` wrote by best parent (checked against the
JSON), nodes link to the served SAE's feature pages or into the tree, thumbnails come from each SAE's index, the
feature page lists its parents and children, and a run without a tree says how to make one (404)."""

import html
import json
import re
from html.parser import HTMLParser

import pytest
from fastapi.testclient import TestClient

from saex.cli import main
from saex.explorer.app import create_app
from tests.explorer.conftest import copy_run

UP, DOWN = "topk-k4+topk-k8", "k8-over-k4"  # the served SAE (topk-k8, the only one indexed) as children, as parents


class Nesting(HTMLParser):
    """(node, parent node) of every tree node li, from how the page nests them, and each node's first link."""

    def __init__(self):
        super().__init__()
        self.stack, self.pairs, self.link, self.tags = [], [], {}, []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append((tag, a.get("data-node")))
        if tag == "li" and a.get("data-node"):
            self.pairs.append((a["data-node"], self.stack[-1] if self.stack else None))
            self.stack.append(a["data-node"])
        if tag == "a" and "tree-id" in a.get("class", "") and self.stack:
            self.link.setdefault(self.stack[-1], (a["href"], a.get("title", "")))
        if tag == "img" and self.stack:
            self.link.setdefault(("img", self.stack[-1]), a["src"])

    def handle_endtag(self, tag):
        while self.tags:
            t, node = self.tags.pop()
            if t == tag:
                if node and self.stack and self.stack[-1] == node:
                    self.stack.pop()
                break


@pytest.fixture(scope="module")
def tree_run(image_run, tmp_path_factory):
    run, _ = copy_run(image_run, tmp_path_factory.mktemp("trees") / "run", ablation=False)
    assert main(["tree", "--run", str(run), "--saes", "topk-k4,topk-k8", "--rows", "4000"]) == 0
    # equal widths keep the order given: topk-k8 is the parent level here
    assert main(["tree", "--run", str(run), "--saes", "topk-k8,topk-k4", "--rows", "4000", "--name", DOWN]) == 0
    trees = {n: json.loads((run / "trees" / f"{n}.json").read_text()) for n in (UP, DOWN)}
    assert all(t["best_parent"] for t in trees.values())  # same init, little training: the latents pair up
    return run, trees


@pytest.fixture(scope="module")
def tree_client(tree_run):
    return TestClient(create_app(tree_run[0]))


def test_the_tree_is_drawn_by_best_parent(tree_run, tree_client):
    run, trees = tree_run
    t = trees[UP]
    r = tree_client.get(f"/tree/{UP}?limit=500")
    assert r.status_code == 200, r.text
    page = Nesting()
    page.feed(r.text)
    drawn = dict(page.pairs)
    # every child under its best parent, every best-parent pair drawn (at most 32 children per node are)
    assert all(t["best_parent"][c] == p for c, p in drawn.items() if p is not None)
    roots = {p for p in t["best_parent"].values() if p not in t["best_parent"]}
    assert {c for c, p in drawn.items() if p is None} == roots
    kids = {}
    for c, p in t["best_parent"].items():
        kids.setdefault(p, []).append(c)
    assert sum(1 for p in drawn.values() if p is not None) == sum(min(len(v), 32) for v in kids.values())
    # /tree shows a tree holding the served SAE, and lists the others
    r = tree_client.get("/tree")  # the first tree (by name) holding the served SAE: both do
    assert r.status_code == 200 and f"<h1>Feature tree {DOWN}</h1>" in r.text and f'href="/tree/{UP}"' in r.text
    assert '<a href="/tree">trees</a>' in r.text


def test_nodes_link_to_the_served_sae_or_say_how_to_serve_theirs(tree_run, tree_client):
    run, trees = tree_run
    page = Nesting()
    page.feed(tree_client.get(f"/tree/{UP}?limit=500").text)
    served = [n for n, _ in page.pairs if n.startswith("topk-k8/")]
    other = [n for n, _ in page.pairs if n.startswith("topk-k4/")]
    assert served and other
    for n in served:
        assert page.link[n][0] == f"/feature/{n.split('/')[1]}"
    for n in other:
        href, title = page.link[n]
        assert html.unescape(href) == f"/tree/{UP}?root={n}"
        assert f"saex index --run {run} --sae topk-k4" in html.unescape(title)  # topk-k4 has no index
    # the served SAE's nodes show thumbnails from its index, served from RUN/index/<sae>/thumbs
    src = html.unescape(page.link[("img", served[0])])
    assert re.fullmatch(r"/tree-thumbs/topk-k8/thumbs/[^/?]+\.png\?v=\w+", src), src
    img = tree_client.get(src)
    assert img.status_code == 200 and img.content[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run / "index" / "topk-k8" / "thumbs" / src.split("/")[-1].split("?")[0]).read_bytes() == img.content
    assert tree_client.get("/tree-thumbs/topk-k8/index.sqlite").status_code == 404  # images only
    # a node's own subtree: itself as the one root
    root = other[0]
    sub = Nesting()
    sub.feed(tree_client.get(f"/tree/{UP}", params={"root": root}).text)
    assert [n for n, p in sub.pairs if p is None] == [root]


def test_the_feature_page_links_its_parents_and_children(tree_run, tree_client):
    run, trees = tree_run
    up, down = trees[UP], trees[DOWN]
    child = next(c for c in up["best_parent"] if c.startswith("topk-k8/"))
    j = int(child.split("/")[1])
    text = tree_client.get(f"/feature/{j}").text
    section = text[text.index('id="tree-links"'):]
    parent = up["best_parent"][child]
    assert f'href="/tree/{UP}?root={parent}" class="best"' in html.unescape(section)  # topk-k4: into the tree
    # in the other tree topk-k8/j is a parent: its children, the ones that chose it marked
    mine = sorted((e for e in down["edges"] if e["parent"] == child), key=lambda e: -e["score"])
    for e in mine[:24]:
        assert f'href="/tree/{DOWN}?root={e["child"]}"' in html.unescape(section)
    best_of = [e["child"] for e in mine[:24] if down["best_parent"][e["child"]] == child]
    assert html.unescape(section).count('class="best" title="this is its best parent"') == len(best_of)
    # a Matryoshka-free check of the served side: a tree whose parents are topk-k8 links them to feature pages
    served_parent = next(p for c, p in down["best_parent"].items())
    k = int(served_parent.split("/")[1])
    kid = next(c for c, p in down["best_parent"].items() if p == served_parent)
    page = Nesting()
    page.feed(tree_client.get(f"/tree/{DOWN}", params={"root": served_parent}).text)
    assert page.link[served_parent][0] == f"/feature/{k}" and (kid, served_parent) in page.pairs


def test_without_a_tree_the_view_is_a_clear_404(image_run, tmp_path, tree_client):
    run, _ = copy_run(image_run, tmp_path / "run", ablation=False)
    client = TestClient(create_app(run))
    for path in ("/tree", "/tree/anything"):
        r = client.get(path)
        assert r.status_code == 404 and "no feature tree" in r.text and "saex tree --run" in r.text
        assert "<h1>Not Found</h1>" in r.text  # the site's error page
    feature = client.get("/feature/0")
    assert feature.status_code == 200 and 'id="tree-links"' not in feature.text
    assert '<a href="/tree">trees</a>' not in feature.text  # no tree: no link in the navigation
    r = tree_client.get("/tree/nope")
    assert r.status_code == 404 and "no tree named 'nope'" in html.unescape(r.text) and UP in html.unescape(r.text)
    r = tree_client.get(f"/tree/{UP}", params={"root": "topk-k4/999999"})
    assert r.status_code == 404 and "is not in tree" in r.text


def test_text_nodes_show_the_strongest_token_of_each_top_example(tmp_path):
    """Briefs on a hand-built index: the token of highest activation in each top example's window, rank order."""
    import sqlite3

    from saex.explorer.schema import SCHEMA
    from saex.explorer.tree_view import Briefs

    (tmp_path / "index" / "lm").mkdir(parents=True)
    db = sqlite3.connect(tmp_path / "index" / "lm" / "index.sqlite")
    db.executescript(SCHEMA)
    db.executemany("INSERT INTO examples VALUES (?, ?, -1, ?, NULL, 0, 1)", [(0, "a", "the cat"), (1, "b", "a dog")])
    windows = {(3, 0): [["the", 0.1], [" cat", 0.9]], (3, 1): [[" a", 0.7], [" dog", 0.2]], (4, 0): [["x", 1.0]]}
    db.executemany("INSERT INTO feature_examples VALUES (?, 'top', ?, ?, 1.0, ?)",
                   [(f, r, r, json.dumps(w)) for (f, r), w in windows.items()])
    db.execute("INSERT INTO feature_examples VALUES (3, 'sample', 0, 1, 0.5, ?)", (json.dumps([["no", 9.0]]),))
    db.commit()
    nodes = [{"sae": "lm", "latent": 3}, {"sae": "lm", "latent": 4}, {"sae": "lm", "latent": 5},
             {"sae": "unindexed", "latent": 3}]
    got = Briefs(tmp_path, lambda sae, name: name).of(nodes)
    assert got == {"lm/3": {"thumbs": [], "tokens": [" cat", " a"]}, "lm/4": {"thumbs": [], "tokens": ["x"]}}
