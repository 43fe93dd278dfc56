"""Every page and the game in a real headless Chromium (Debian's), with screenshots kept as artefacts
in test-artifacts/screenshots/."""

import json
import random
import re
import shutil
import sqlite3
from pathlib import Path

import pytest

from saex.analysis.edit import Edit, load_edits
from saex.explorer.app import create_app, find_index
from saex.explorer.db import IndexDB
from tests.explorer.conftest import serve

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SHOTS = Path(__file__).parents[2] / "test-artifacts" / "screenshots"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-quic"]

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (make setup installs it)")


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def site(image_run):
    url, server = serve(create_app(image_run))
    yield url
    server.should_exit = True


def _page(browser, **options):
    page = browser.new_page(viewport={"width": 1200, "height": 900}, **options)
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    return page, errors


def _shot(page, name):
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def test_overview_scatter_opens_a_feature(browser, site):
    page, errors = _page(browser)
    page.goto(site + "/")
    page.wait_for_function("document.getElementById('scatter').dataset.points > 0")
    assert "L0" in page.inner_text("table.metrics")
    _shot(page, "overview")
    # click on the first plotted point: it opens that feature
    point = page.evaluate("""async () => {
        const d = await (await fetch('/api/scatter')).json();
        const c = document.getElementById('scatter'), r = c.getBoundingClientRect();
        const ld = d.density.map(Math.log10), lm = d.mean_top20.map(m => Math.log10(Math.max(m, 1e-6)));
        const xr = [Math.min(...ld), Math.max(...ld) + 1e-9], yr = [Math.min(...lm), Math.max(...lm) + 1e-9];
        const x = 58 + (ld[0] - xr[0]) / (xr[1] - xr[0]) * (c.width - 68), y = c.height - 30 - (lm[0] - yr[0]) / (yr[1] - yr[0]) * (c.height - 40);
        return {x: r.left + x, y: r.top + y};
    }""")
    page.mouse.click(point["x"], point["y"])
    page.wait_for_url(re.compile(r".*/feature/\d+"))
    assert page.locator("h1").inner_text().startswith("Feature")
    assert not errors, errors


def _full_feature(image_run) -> int:
    """A feature with a full grid of 16 top examples."""
    db = sqlite3.connect(image_run / "index" / "topk-k8" / "index.sqlite")
    return db.execute("SELECT feature FROM feature_examples WHERE kind = 'top' GROUP BY feature "
                      "HAVING COUNT(*) = 16 LIMIT 1").fetchone()[0]


def test_feature_page_grid_plots_and_navigation(browser, site, image_run):
    j = _full_feature(image_run)
    page, errors = _page(browser)
    page.goto(f"{site}/feature/{j}")
    assert page.locator("#top-grid img").count() == 16
    page.wait_for_function("document.getElementById('act-hist').getContext('2d') !== null")
    assert page.locator("#labels div").count() >= 1
    _shot(page, "feature")
    page.click("#next")
    page.wait_for_url(re.compile(r".*/feature/\d+"))
    assert int(page.url.rsplit("/", 1)[1].split("?")[0]) > j
    page.fill("#jump", str(j))
    page.click("form.nav button")
    page.wait_for_url(re.compile(rf".*/feature/{j}(\?.*)?$"))
    page.check("input[name=hide_cluster]")
    page.click("form.nav button")
    page.wait_for_url(re.compile(r".*hide_cluster=true.*"))
    assert not errors, errors


def test_example_page_heatmap(browser, site, image_run):
    db = sqlite3.connect(image_run / "index" / "topk-k8" / "index.sqlite")
    ex = db.execute("SELECT example FROM examples WHERE thumb IS NOT NULL LIMIT 1").fetchone()[0]
    page, errors = _page(browser)
    page.goto(f"{site}/example/{ex}")
    page.wait_for_function("document.getElementById('heatmap').dataset.feature !== undefined")
    second = page.locator("tr[data-feature]").nth(1)
    feature = second.get_attribute("data-feature")
    second.locator("td").nth(1).click()
    page.wait_for_function(f"document.getElementById('heatmap').dataset.feature === '{feature}'")
    _shot(page, "example")
    assert not errors, errors


def _answer(run, seed, mode="input"):
    """The right choice of a seeded round, as the app draws it (the page itself does not tell it)."""
    db = IndexDB(find_index(run))
    example = db.game_round(random.Random(seed), 4, None)["answer"]
    return example if mode == "input" else db.example(example)["label"]


def _guess(page, choice):
    page.click(f'.option[data-choice="{choice}"]')
    page.wait_for_function("document.getElementById('verdict').textContent !== ''")  # the server tells the answer
    return page.inner_text("#verdict")


def test_game_scores_a_guess(browser, site, image_run):
    page, errors = _page(browser)
    page.goto(site + "/game?seed=7")
    assert page.locator(".option").count() == 4
    _shot(page, "game")
    assert _guess(page, _answer(image_run, 7)) == "Right!"
    assert page.inner_text("#score") == "1" and page.inner_text("#streak") == "1"
    page.goto(site + "/game?seed=8")
    answer = _answer(image_run, 8)
    wrong = next(c for c in page.locator(".option").evaluate_all("bs => bs.map(b => +b.dataset.choice)") if c != answer)
    assert _guess(page, wrong).startswith("Not this one")
    assert page.inner_text("#streak") == "0" and page.inner_text("#score") == "1"
    assert page.locator(".option.right").get_attribute("data-choice") == str(answer)  # the answer, outlined
    _shot(page, "game-answered")
    assert not errors, errors


def test_unknown_feature_page(browser, site):
    page, _ = _page(browser)
    response = page.goto(site + "/feature/424242")
    assert response.status == 404 and "does not exist" in page.inner_text("p.error")
    _shot(page, "not-found")


def test_text_feature_page_highlights_tokens(browser, text_run):
    url, server = serve(create_app(text_run))
    try:
        page, errors = _page(browser)
        page.goto(url + "/features")
        assert page.locator("#top-grid .tok").count() > 0
        _shot(page, "feature-text")
        assert not errors, errors
    finally:
        server.should_exit = True


def test_guess_the_class(browser, site, image_run):
    page, errors = _page(browser)
    page.goto(site + "/game?mode=class&seed=5")
    assert page.locator(".option").count() == 10  # the ten Fashion-MNIST classes
    assert _guess(page, _answer(image_run, 5, "class")) == "Right!"
    _shot(page, "game-class")
    assert not errors, errors


def _effect_version(page, box, at_least, timeout=60_000):
    """Wait until the effect panel `box` has drawn `at_least` answers of the edit API (the first loads the model)."""
    page.wait_for_function(f"+(document.getElementById('{box}').dataset.version || 0) >= {at_least}", timeout=timeout)
    return float(page.get_attribute(f"#{box}", "data-kl"))


def _edited(page, box):
    return page.eval_on_selector_all(f"#{box} .probs > div", "rows => rows.map(r => +r.dataset.edited)")


def test_edit_page_toggles_a_feature_and_the_effect_follows(browser, site, image_run, tmp_path):
    db = sqlite3.connect(image_run / "index" / "topk-k8" / "index.sqlite")
    ex = db.execute("SELECT example FROM examples WHERE thumb IS NOT NULL LIMIT 1").fetchone()[0]
    page, errors = _page(browser, accept_downloads=True)
    page.goto(f"{site}/edit/{ex}")
    assert _effect_version(page, "effect", 1) == 0  # no edit yet: the clean model
    assert page.locator("#effect .probs > div").count() == 10 and page.locator("#effect .neighbours img").count() == 16
    row = page.locator("#edit-features tr[data-feature]").first
    j = int(row.get_attribute("data-feature"))
    row.locator("input.on").uncheck()
    assert _effect_version(page, "effect", 2) > 0
    assert json.loads(page.input_value("#edit-list")) == [{"op": "zero", "features": [j]}]
    assert row.locator("td.after").inner_text() == "0.000" and row.locator("input.clamp").is_disabled()
    page.screenshot(path=str(tmp_path / "edit.png"), full_page=True)
    _shot(page, "edit")
    with page.expect_download() as download:
        page.click("#download")
    assert load_edits(download.value.path(), 256) == [Edit("zero", [j])]  # the file `saex edit --edits` reads
    page.fill("#edit-list", json.dumps([{"op": "scale", "features": [j], "value": 2}, {"op": "add", "features": [3], "value": 4}]))
    page.click("#load")  # a pasted list: the table takes the scale, the add stays in the list below it
    _effect_version(page, "effect", 3)
    assert row.locator("input.on").is_checked() and row.locator("input.scale").input_value() == "2"
    assert page.locator("#extra li").count() == 1 and '"op":"add"' in page.inner_text("#extra li")
    assert not errors, errors


def test_steer_slider_changes_the_probabilities(browser, site, image_run, tmp_path):
    j = _full_feature(image_run)
    page, errors = _page(browser)
    page.goto(f"{site}/feature/{j}")
    page.focus("#alpha")
    page.keyboard.press("End")  # alpha 20
    assert _effect_version(page, "steer-effect", 1) > 0
    up = _edited(page, "steer-effect")
    assert page.inner_text("#alpha-value") == "20" and len(up) == 10
    page.keyboard.press("Home")  # alpha -20
    _effect_version(page, "steer-effect", 2)
    down = _edited(page, "steer-effect")
    assert down != up and sum(down) == pytest.approx(1, abs=1e-4)
    assert page.locator("#steer-effect .neighbours img").count() == 16  # before and after, 8 each
    assert "edits=" in page.get_attribute("#steer-edit", "href")
    page.screenshot(path=str(tmp_path / "steer.png"), full_page=True)
    _shot(page, "steer")
    assert not errors, errors


def test_attribution_toggle_swaps_the_top_images_for_overlays(browser, site, image_run):
    j = _full_feature(image_run)
    page, errors = _page(browser)
    page.goto(f"{site}/feature/{j}")
    srcs = "() => [...document.querySelectorAll('#top-grid img')].map(i => i.getAttribute('src'))"
    loaded = "() => [...document.querySelectorAll('#top-grid img')].every(i => i.complete && i.naturalWidth > 0)"
    thumbs = page.evaluate(srcs)
    assert len(thumbs) == 16 and all(s.startswith("/thumbs/") for s in thumbs)
    page.check("#attr-on")
    shown = page.evaluate(srcs)
    examples = page.eval_on_selector_all("#top-grid img", "imgs => imgs.map(i => i.dataset.example)")
    assert [s.split("?")[0] for s in shown] == [f"/attribution/{ex}/{j}.png" for ex in examples]
    assert all("method=integrated-gradients&v=" in s for s in shown)
    page.wait_for_function(loaded, timeout=120_000)  # each computed on the server, one at a time (the first loads the model)
    _shot(page, "feature-attribution")
    page.select_option("#attr-method", "occlusion")
    assert all("method=occlusion" in s for s in page.evaluate(srcs))
    page.wait_for_function(loaded, timeout=120_000)
    page.uncheck("#attr-on")
    assert page.evaluate(srcs) == thumbs
    assert not errors, errors


def test_the_ablation_ranking_links_to_feature_pages(browser, site, image_run):
    db = sqlite3.connect(image_run / "index" / "topk-k8" / "index.sqlite")
    best = db.execute("SELECT feature FROM ablation ORDER BY loss_delta DESC LIMIT 1").fetchone()[0]
    page, errors = _page(browser)
    page.goto(f"{site}/ablation")
    first = page.locator("#ranking tr").nth(1).locator("a").first
    assert first.inner_text() == str(best)  # the largest loss change first, as the table has it
    _shot(page, "ablation")
    first.click()
    page.wait_for_url(re.compile(rf".*/feature/{best}$"))
    assert page.locator("h2", has_text="Ablation on its top examples").count() == 1
    assert not errors, errors
