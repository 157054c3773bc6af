import json
import re
from pathlib import Path

import numpy as np
import pytest

from fruitlens.cli.main import main
from fruitlens.evaluation import plots
from fruitlens.evaluation.html import render_html
from fruitlens.evaluation.metrics import ValidationGap, ci_text, compute_metrics, gap_text, validation_gap
from fruitlens.evaluation.report import Report
from fruitlens.pipelines.evaluate import evaluate
from conftest import file_hashes, make_tree

Y = np.array([0, 0, 1, 1, 2])
P = np.array([[0.78, 0.11, 0.11], [0.28, 0.62, 0.10], [0.11, 0.78, 0.11], [0.2, 0.7, 0.1], [0.52, 0.3, 0.18]])


def test_metrics_on_a_case_computed_by_hand():
    m = compute_metrics(Y, P, ["a", "b", "c"])
    assert m.confusion_matrix == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    assert np.sum(m.confusion_matrix) == m.n == 5
    assert m.accuracy == pytest.approx(0.6)
    cm = np.array(m.confusion_matrix)
    assert m.accuracy == pytest.approx(np.trace(cm) / cm.sum())
    recalls = [m.per_class[c]["recall"] for c in "abc"]
    assert recalls == pytest.approx([0.5, 1.0, 0.0])
    assert recalls == pytest.approx(list(np.diag(cm) / cm.sum(1)))
    assert [m.per_class[c]["precision"] for c in "abc"] == pytest.approx([0.5, 2 / 3, 0.0])
    assert m.balanced_accuracy == pytest.approx(0.5)
    assert m.ece == pytest.approx((0.52 + 0.62 + 0.30 + 2 * 0.22) / 5)
    assert m.log_loss == pytest.approx(-np.mean(np.log([0.78, 0.28, 0.78, 0.7, 0.18])))
    assert m.top_k_accuracy == {}  # 3 classes: top-3 would be trivially 1
    assert m.most_confused[0]["count"] == 1
    from scipy.stats import binomtest

    ci = binomtest(3, 5).proportion_ci(method="wilson")  # 3 of 5 right
    assert m.accuracy_ci95 == pytest.approx([ci.low, ci.high], abs=1e-4)
    assert ci_text(m) == "95% CI 23.1-88.2%"


def test_interval_counts_near_duplicate_groups_as_one_try_each():
    from fruitlens.evaluation.metrics import grouped_interval, wilson_interval

    # 100 images: 10 groups of 10 frames; the 10 mistakes are all frames of one fruit
    correct = np.array([0] * 10 + [1] * 90)
    groups = np.repeat([f"g{i}" for i in range(10)], 10)
    plain = wilson_interval(90, 100)
    assert grouped_interval(correct, [""] * 100)["ci95"] == pytest.approx(list(plain))  # no groups: Wilson
    assert grouped_interval(correct, range(100))["ci95"] == pytest.approx(list(plain))
    got = grouped_interval(correct, groups)
    # by hand: per-group sums of (correct - 0.9) are -9 once and +1 nine times; var = 10/9 * 90 / 100^2 = 0.01
    assert got["groups"] == 10 and got["effective_n"] == pytest.approx(0.9 * 0.1 / 0.01)
    assert got["ci95"] == pytest.approx(list(wilson_interval(0.9 * 9, 9)))
    assert got["ci95"][0] < plain[0] - 0.1  # far wider than 100 independent images would give
    # the same mistakes spread over the groups (one per group): the groups do not vary, no wider than Wilson
    spread = np.ones(100)
    spread[::10] = 0
    assert grouped_interval(spread, groups)["ci95"] == pytest.approx(list(plain))
    # all right: nothing to estimate the spread from, so each group counts once (10 of 10 right)
    assert grouped_interval(np.ones(100), groups)["ci95"] == pytest.approx(list(wilson_interval(10, 10)))
    m = compute_metrics(np.zeros(100, int), np.eye(2)[1 - correct], ["a", "b"], groups)
    assert (
        m.accuracy_groups == 10
        and ci_text(m) == f"95% CI {100 * got['ci95'][0]:.1f}-{100 * got['ci95'][1]:.1f}% over 10 near-duplicate groups"
    )


def test_gallery_shows_one_image_per_near_duplicate_group(tmp_path):
    from fruitlens.evaluation.report import gallery as _gallery
    from conftest import fruit_image

    paths = []
    for i in range(6):
        paths.append(str(tmp_path / f"{i}.jpg"))
        fruit_image("apple", i).save(paths[-1])
    y = np.zeros(6, int)  # all "a"; images 0-3 are read as "b": frames 0-2 of one fruit, image 3 alone
    probs = np.array([[0.1, 0.9], [0.2, 0.8], [0.3, 0.7], [0.4, 0.6], [0.9, 0.1], [0.6, 0.4]])
    got = _gallery(paths, y, probs, ["a", "b"], 3, ["g0", "g0", "g0", "", "g1", "g1"])
    assert [(g["path"][-5:], g["like_it"]) for g in got["worst_mistakes"]] == [("0.jpg", 2), ("3.jpg", 0)]
    assert [(g["path"][-5:], g["like_it"]) for g in got["least_confident_correct"]] == [("5.jpg", 0)]
    page = render_html(Report(gallery=got), {})
    assert "+2 near-duplicates like it" in page and page.count("<figure>") == 3
    # under a class map the answer is the top model class, mapped; image 4's summed probabilities favour "a", but
    # its answer was "b": it is a mistake, shown with the summed probability of its answer
    answers = np.array([1, 1, 1, 1, 1, 0])
    mapped = _gallery(paths, y, probs, ["a", "b"], 3, [str(i) for i in range(6)], pred=answers)
    assert [g["path"][-5:] for g in mapped["worst_mistakes"]] == ["0.jpg", "1.jpg", "2.jpg"]
    assert [(g["path"][-5:], g["predicted"]) for g in mapped["least_confident_correct"]] == [("5.jpg", "a")]
    assert 4 not in [int(g["path"][-5]) for g in mapped["least_confident_correct"]]
    later = _gallery(paths, y, probs, ["a", "b"], 9, [str(i) for i in range(6)], pred=answers)["worst_mistakes"]
    assert ("4.jpg", 0.1) in [(g["path"][-5:], g["confidence"]) for g in later]


def test_validation_gap_when_validation_photos_resemble_training():
    from fruitlens.training.history import HistoryRow

    hist = [
        HistoryRow(phase="head", val_loss=0.3, val_acc=0.90),
        HistoryRow(phase="head", val_loss=0.07, val_acc=0.99),
        HistoryRow(phase="fine-tune", val_loss=0.2, val_acc=0.95),
    ]  # the kept model: best validation loss
    m = compute_metrics(np.array([0] * 83 + [1] * 28), np.eye(2)[[0] * 83 + [0] * 28], ["a", "b"])  # 74.8% of 111
    gap = validation_gap(hist, m, n_val=171)
    assert gap == ValidationGap(0.99, 171, pytest.approx(83 / 111), True)
    assert gap_text(gap, "test").startswith("validation accuracy 99.0% is far above this test accuracy (74.8%)")
    # 10 validation images: 99% of them is no evidence (intervals overlap); nor is a gap within the noise
    assert not validation_gap(hist, m, n_val=10).significant and gap_text(None, "test") == ""
    assert not validation_gap([HistoryRow(val_loss=0.1, val_acc=0.80)], m, n_val=171).significant
    assert validation_gap([], m, n_val=171) is None and validation_gap(hist, m, n_val=0) is None


def test_one_class_folder_is_evaluated_without_library_warnings():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. scikit-learn's "A single label was found in 'y_true' and 'y_pred'"
        m = compute_metrics(
            np.array([1, 1, 1]), np.array([[0.1, 0.8, 0.1], [0.2, 0.7, 0.1], [0.3, 0.6, 0.1]]), ["a", "b", "c"]
        )
    assert m.accuracy == 1.0 and m.balanced_accuracy == 1.0


def test_class_absent_from_test_split():
    m = compute_metrics(
        np.array([0, 1, 0]), np.array([[0.9, 0.05, 0.05], [0.1, 0.8, 0.1], [0.6, 0.3, 0.1]]), ["a", "b", "c"]
    )
    assert m.classes_absent_from_data == ["c"] and m.per_class["c"]["support"] == 0
    assert m.macro_recall == pytest.approx(1.0)  # over the classes present
    macro_row = next(line for line in m.classification_report.splitlines() if "macro avg" in line)
    assert float(macro_row.split()[4]) == pytest.approx(m.macro_f1, abs=1e-4)  # the table says what the headline says
    assert "not in these images (left out of the averages): c" in m.classification_report


def test_prediction_of_an_absent_class_counts_as_an_error_without_a_warning(recwarn):
    m = compute_metrics(
        np.array([0, 1, 0]), np.array([[0.9, 0.05, 0.05], [0.1, 0.8, 0.1], [0.1, 0.2, 0.7]]), ["a", "b", "c"]
    )
    assert m.accuracy == pytest.approx(2 / 3) and m.macro_recall == pytest.approx(0.75)
    assert not [w for w in recwarn if "y_pred" in str(w.message)]


@pytest.mark.parametrize("n", [2, 100])
def test_heatmap_and_html_for_2_and_100_classes(tmp_path, n):
    rng = np.random.default_rng(0)
    y = rng.integers(0, n, 500)
    probs = rng.dirichlet(np.ones(n), 500)
    probs[np.arange(500), y] += 1
    probs /= probs.sum(1, keepdims=True)
    classes = [f"class <{i}>" for i in range(n)]
    m = compute_metrics(y, probs, classes)
    png = plots.confusion_heatmap(np.array(m.confusion_matrix), classes, tmp_path / "cm.png", True, "cm")
    assert png.stat().st_size > 1000
    from fruitlens.evaluation.report import LeakNote, ModelNote
    from fruitlens.models.preprocessing import Preprocessing

    report = Report(
        run="r",
        evaluated_on="test",
        data="d",
        classes=classes,
        metrics=m,
        leak=LeakNote(leak_free=True),
        model=ModelNote("x", "pytorch", Preprocessing(32, 32, (0, 0, 0), (1, 1, 1)), 1, 1),
    )
    page = render_html(report, {"confusion_normalised": "data:image/png;base64,AAAA"})
    assert "class &lt;1&gt;" in page and "<1>" not in page  # labels are escaped
    assert "validation-gap" not in page
    report.validation_gap = ValidationGap(0.99, 171, 0.75, True)
    assert "Validation overstates:</b> validation accuracy 99.0%" in render_html(report, {})
    assert page.count("<tr>") >= n


def test_evaluate_run_numbers_agree_and_report_is_self_contained(run_copy):
    before = json.loads((run_copy / "report.json").read_text())
    rep = evaluate(run_copy)
    m = rep.metrics
    cm = np.array(m.confusion_matrix)
    assert cm.sum() == m.n == rep.dataset.totals["test"]
    assert m.accuracy == pytest.approx(np.trace(cm) / cm.sum())
    html = (run_copy / "report.html").read_text()
    assert not re.search(r'src="(?!data:)', html)  # every image embedded
    assert "Confusion matrix" in html and "Classification report" in html
    assert f"accuracy ({ci_text(m)})" in html and ci_text(m).startswith("95% CI ")  # how far the figure may be off
    assert rep.validation_gap.val_images == rep.dataset.totals["val"]
    saved = Report.from_json(run_copy / "report.json")
    assert saved.metrics.accuracy == m.accuracy and saved.metrics == m
    assert (run_copy / "classification_report.txt").read_text().strip().startswith("precision")
    # evaluating a run later keeps the training time that the train command measured
    assert rep.timing.train_seconds == before["timing"]["train_seconds"] > 0
    assert rep.timing.fit_seconds == before["timing"]["fit_seconds"] > 0


def test_report_json_round_trips_through_the_dataclass(trained_run):
    saved = json.loads((trained_run / "report.json").read_text())
    again = json.loads(
        json.dumps(
            __import__("fruitlens.jsonio", fromlist=["json_safe"]).json_safe(
                Report.from_json(trained_run / "report.json")
            )
        )
    )
    assert again == saved


def _other_folder(tmp_path):
    data = make_tree(tmp_path / "other", per_class=4, classes=("apple", "plum", "kiwi", "lemon"), size=48)
    for f in (data / "plum").iterdir():
        f.rename(data / "apple" / f.name)
    (data / "plum").rmdir()
    (data / "apple").rename(data / "red")
    (data / "lemon").rename(data / "citrus")
    (data / "melon").mkdir()
    (data / "kiwi" / "kiwi_000.jpg").rename(data / "melon" / "m.jpg")
    for i in range(3):  # a burst: three copies of one photo are one near-duplicate group, not four tries
        (data / "kiwi" / f"burst_{i}.jpg").write_bytes((data / "kiwi" / "kiwi_001.jpg").read_bytes())
    return data


def test_evaluate_other_folder_with_class_map(run_copy, tmp_path, capsys):
    data = _other_folder(tmp_path)
    cmap = tmp_path / "map.json"
    cmap.write_text(json.dumps({"red": ["apple", "plum"], "kiwi": "kiwi", "citrus": ["lemon"]}))
    own = {p: h for p, h in file_hashes(run_copy).items()}
    assert main(["evaluate", str(run_copy), str(data), "--class-map", str(cmap)]) == 0
    assert f"report: {run_copy / 'eval' / 'other' / 'report.html'}" in capsys.readouterr().out
    rep = json.loads((run_copy / "eval" / "other" / "report.json").read_text())
    assert rep["classes"] == ["citrus", "kiwi", "red"] and rep["evaluated_on"] == "other"
    assert rep["metrics"]["n"] == 18 and rep["unmapped_images"] == {"melon": 1}
    assert rep["metrics"]["accuracy_groups"] == 15
    # the run's own report, plots and everything else are untouched: only eval/other/ is new
    after = file_hashes(run_copy)
    assert {p: h for p, h in after.items() if not p.startswith("eval/")} == own
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"red": ["cherry"]}))
    assert main(["evaluate", str(run_copy), str(data), "--class-map", str(bad)]) != 0
    assert "which the model does not know" in capsys.readouterr().err


def test_class_map_numbers_follow_the_mapping(run_copy, tmp_path, monkeypatch):
    """Accuracy and confusion matrix on a map where a wrong class-to-column mapping would give other numbers."""
    import shutil

    import fruitlens.pipelines.evaluate as evaluate_module
    from fruitlens.evaluation.classmap import ClassMapping
    from fruitlens.inference.predictor import Predictor
    from fruitlens.models.probs import softmax

    shown = {}  # the answers the report's gallery is given
    real_gallery = evaluate_module.gallery

    def capture(*args, **kwargs):
        shown["pred"] = args[8] if len(args) > 8 else kwargs.get("pred")
        return real_gallery(*args, **kwargs)

    monkeypatch.setattr(evaluate_module, "gallery", capture)

    p = Predictor.load(run_copy)
    data = make_tree(tmp_path / "d", per_class=5, classes=("apple", "kiwi", "lemon", "plum"), size=48)
    shutil.move(str(data / "apple"), str(data / "fruit_a"))
    shutil.move(str(data / "plum"), str(data / "fruit_b"))
    cmap = tmp_path / "m.json"
    cmap.write_text(json.dumps({"fruit_a": "apple", "fruit_b": ["plum", "kiwi"]}))  # lemon is left out: "(other)"
    rep = evaluate(run_copy, str(data), class_map=str(cmap))
    assert rep.classes == ["fruit_a", "fruit_b", "(other)"] and rep.unmapped_images == {"kiwi": 5, "lemon": 5}
    # by hand: the model's own predictions, each mapped to its column
    files = sorted((data / "fruit_a").iterdir()) + sorted((data / "fruit_b").iterdir())
    probs = softmax(p.logits(files))
    column = {"apple": 0, "plum": 1, "kiwi": 1, "lemon": 2}
    pred = [column[p.classes[i]] for i in probs.argmax(1)]
    assert shown["pred"] is not None and list(shown["pred"]) == pred  # the gallery shows what predict answers
    truth = [0] * 5 + [1] * 5
    cm = np.zeros((3, 3), int)
    for t, q in zip(truth, pred):  # the documented rule: right when predict's answer is a class the map lists
        cm[t, q] += 1
    assert rep.metrics.confusion_matrix == cm.tolist()
    assert rep.metrics.accuracy == pytest.approx(np.mean(np.array(pred) == truth))
    # summing kiwi and plum into fruit_b (``collapse``) can change an argmax; where the model's top class is
    # unambiguous the summed column is that class's column
    mapped = ClassMapping.load(cmap, p.classes).collapse(probs).argmax(1)
    assert sum(a == b for a, b in zip(pred, mapped)) >= 8
    for bad, msg in (({"fruit_a": 3}, "must map to a model class"), ([], "non-empty JSON object")):
        cmap.write_text(json.dumps(bad))
        with pytest.raises(Exception, match=msg):
            evaluate(run_copy, str(data), class_map=str(cmap))


def test_a_model_class_that_counts_for_several_data_classes_counts_for_each(run_copy, tmp_path):
    """GroceryStore's apple varieties each accept every Fruits-360 apple: an image is right when the model's answer
    is one its own class accepts (a map that gave a shared model class to one column made the others always wrong)."""
    import shutil

    from fruitlens.evaluation.classmap import ClassMapping
    from fruitlens.inference.predictor import Predictor
    from fruitlens.models.probs import softmax

    data = make_tree(tmp_path / "d", per_class=5, classes=("apple", "plum", "kiwi"), size=48)
    shutil.move(str(data / "apple"), str(data / "red_one"))
    shutil.move(str(data / "plum"), str(data / "red_two"))
    cmap = tmp_path / "m.json"
    cmap.write_text(json.dumps({"red_one": ["apple", "plum"], "red_two": ["apple", "plum"], "kiwi": "kiwi"}))
    rep = evaluate(run_copy, str(data), class_map=str(cmap))
    p = Predictor.load(run_copy)
    files = [sorted((data / c).iterdir()) for c in ("kiwi", "red_one", "red_two")]
    probs = [softmax(p.logits(f)) for f in files]
    col = lambda q, names: float(sum(q[p.classes.index(c)] for c in names))
    # by hand: the image's own column holds what its class accepts; kiwi and the (other) column (lemon) the rest
    right = [sum(col(q, ["kiwi"]) > max(col(q, ["apple", "plum"]), col(q, ["lemon"])) for q in probs[0])]
    right += [sum(col(q, ["apple", "plum"]) > max(col(q, ["kiwi"]), col(q, ["lemon"])) for q in pr) for pr in probs[1:]]
    assert rep.metrics.accuracy == pytest.approx(sum(right) / 15)
    both = ClassMapping.load(cmap, p.classes)
    y = np.array([rep.classes.index("red_one")] * 5)
    collapsed = both.collapse(probs[1], y)
    assert np.allclose(collapsed.sum(1), 1) and (collapsed[:, rep.classes.index("red_two")] == 0).all()


def test_evaluate_a_folder_whose_images_all_fail(run_copy, tmp_path):
    from fruitlens.errors import DataError

    for name in ("apple", "kiwi"):
        (tmp_path / "junk" / name).mkdir(parents=True)
        (tmp_path / "junk" / name / "x.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match="none of the 2 images to evaluate can be decoded"):
        evaluate(run_copy, str(tmp_path / "junk"))


def test_compare_two_runs_and_an_eval_folder(trained_run, tmp_path, capsys, monkeypatch):
    import shutil

    other = shutil.copytree(trained_run, tmp_path / "other_run")
    data = make_tree(tmp_path / "plain", per_class=3, classes=("apple", "kiwi"), size=48)
    evaluate(other, str(data))
    chart = tmp_path / "c.png"
    args = ["compare", str(trained_run), str(other / "eval" / "plain"), "--chart", str(chart)]
    assert main(args + ["--markdown"]) == 0
    out = capsys.readouterr().out
    assert out.count("| small_cnn |") == 2 and chart.stat().st_size > 1000
    assert "| small_cnn | test |" in out and "| small_cnn | plain |" in out  # what each row was evaluated on
    lo, hi = json.loads((trained_run / "report.json").read_text())["metrics"]["accuracy_ci95"]
    assert "| 95% CI |" in out and f"| {100 * lo:.1f}-{100 * hi:.1f}% |" in out
    monkeypatch.chdir(tmp_path)
    (tmp_path / "compare.png").write_text("the user's own file")
    assert main(args[:3]) == 0  # no --chart: no chart, and nothing of the user's overwritten
    assert (tmp_path / "compare.png").read_text() == "the user's own file"
    capsys.readouterr()
    assert main(args + ["--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["evaluated_on"] for r in rows] == ["test", "plain"] and rows[1]["run"].endswith("eval/plain")
    plain = json.loads((other / "eval" / "plain" / "report.json").read_text())
    assert rows[1]["accuracy"] == plain["metrics"]["accuracy"] and rows[1]["parameters"] > 0


def test_missing_run_file_names_the_command(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    assert main(["evaluate", str(tmp_path / "run")]) != 0
    err = capsys.readouterr().err
    assert "lacks checkpoints/best.ckpt" in err and "fruitlens train" in err


@pytest.mark.browser
def test_report_renders_in_headless_chromium(trained_run, tmp_path):
    import shutil

    from conftest import need

    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    need(bool(chromium and driver), "Debian chromium and chromium-driver are not installed")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    run = Path(shutil.copytree(trained_run, tmp_path / "run"))
    evaluate(run)
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--window-size=1200,900",
    ):
        opts.add_argument(arg)
    browser = webdriver.Chrome(service=Service(driver), options=opts)
    try:
        browser.get((run / "report.html").as_uri())
        heat = browser.find_element(By.CSS_SELECTOR, "#confusion img")
        assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", heat) > 300
        rows = browser.find_elements(By.CSS_SELECTOR, "#classification-report tbody tr")
        assert [r.find_element(By.TAG_NAME, "td").text for r in rows] == ["apple", "kiwi", "lemon", "plum"]
        assert "accuracy" in browser.find_element(By.ID, "headline").text
        browser.save_screenshot(str(tmp_path / "report.png"))
        assert (tmp_path / "report.png").stat().st_size > 10_000
    finally:
        browser.quit()
