"""The web page in a real headless Chromium against the local stack (tests/stack_fixtures.py), after
tests/cli/test_stack_e2e.py (one lane): a wrong token, sign-in, a smoke job submitted from the form
followed to the end, its page with its plots, the leaderboard against GET /v1/results, predict on two
NEU-CLS images against the API's answer, a data set name with markup shown as text, another team's
token, sign-out.

The tests run in file order and share one browser (each starts where the previous one left the page);
they submit one job, from the form. Screenshots of every page go to $INCO_SCREENSHOTS (default: a
temporary folder); docs/images/leaderboard.png and job.png are two of them.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from selenium import webdriver
from selenium.common.exceptions import NoAlertPresentException, StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import Select, WebDriverWait

from server.store import access
from server.store.db import make_engine, session_scope
from tests.stack_fixtures import LocalStack

pytestmark = [pytest.mark.integration, pytest.mark.slow]
MARKUP = "<script>alert(1)</script>"
JOB_TIMEOUT_S = 400
made: dict[str, str] = {}
"""What a test made for the next ones: the job submitted from the form."""
INSTALL = "apt-get install -y chromium chromium-driver (scripts/test.sh does it when they are missing)"


# -- the browser -------------------------------------------------------------------------------
def _binary(name: str, default: str) -> str:
    found = shutil.which(name) or default
    if not Path(found).is_file():
        pytest.fail(f"{name} is not installed: the browser tests need Chromium and its driver; {INSTALL}")
    return found


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    """Headless Chromium at 1280x900. The driver's path is given, so Selenium Manager never runs (and
    never tries to download a browser or a driver: there is no network here)."""
    options = webdriver.ChromeOptions()
    options.binary_location = _binary("chromium", "/usr/bin/chromium")
    for arg in (
        "--headless=new",
        "--no-sandbox",  # tests run as root in containers
        "--disable-dev-shm-usage",
        "--window-size=1280,900",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-extensions",
        "--no-first-run",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(_binary("chromedriver", "/usr/bin/chromedriver")), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = os.environ.get("INCO_SCREENSHOTS")
    path = Path(folder) if folder else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def api(local_stack: LocalStack) -> Iterator[httpx.Client]:
    """The same API as the page, with the same token."""
    with httpx.Client(
        base_url=local_stack.api_url, headers={"Authorization": f"Bearer {local_stack.token}"}, timeout=60
    ) as client:
        yield client


def screenshot(driver: WebDriver, path: Path, *, whole_page: bool = False) -> None:
    """The window, or the whole page however long (Chromium's DevTools protocol)."""
    if not whole_page:
        driver.save_screenshot(str(path))
        return
    size = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    clip = {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
    shot = driver.execute_cdp_cmd(
        "Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True, "clip": clip}
    )
    path.write_bytes(base64.b64decode(shot["data"]))


def until(driver: WebDriver, check: Callable[[WebDriver], Any], timeout: float = 30, what: str = "") -> Any:
    # an element the page re-rendered while the check read it is stale: the check is simply asked again
    wait = WebDriverWait(driver, timeout, poll_frequency=0.2, ignored_exceptions=(StaleElementReferenceException,))
    return wait.until(check, message=what)


def visible(driver: WebDriver, css: str) -> WebElement | None:
    found = [e for e in driver.find_elements(By.CSS_SELECTOR, css) if e.is_displayed()]
    return found[0] if found else None


def go(driver: WebDriver, route: str) -> None:
    """Follow a hash route inside the page (no reload: the page keeps its sign-in)."""
    driver.execute_script("location.hash = arguments[0]", route)


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", data[:40]
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def plot_loaded(driver: WebDriver, figure: WebElement, api: httpx.Client, timeout: float = 60) -> tuple[int, int]:
    """Wait for a figure's image; check it has the size of the PNG the API serves at its path."""
    until(driver, lambda d: figure.get_attribute("data-state") != "loading", timeout, "a plot still loading")
    assert figure.get_attribute("data-state") == "shown", figure.text
    img = figure.find_element(By.TAG_NAME, "img")
    until(driver, lambda d: d.execute_script("return arguments[0].complete", img), 10, "an image still decoding")
    shown = driver.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", img)
    assert img.get_attribute("src").startswith("blob:")
    answer = api.get(figure.get_attribute("data-src"))
    assert answer.status_code == 200 and answer.headers["content-type"] == "image/png", answer.text[:300]
    assert shown[0] > 0 and shown[1] > 0 and tuple(shown) == png_size(answer.content)
    return tuple(shown)


def no_alert(driver: WebDriver) -> None:
    with pytest.raises(NoAlertPresentException):
        driver.switch_to.alert.text  # noqa: B018  (reading it is what raises)


def sign_in(driver: WebDriver, token: str) -> None:
    field = until(driver, lambda d: visible(d, "#token"), 10, "the sign-in form")
    field.send_keys(token)
    driver.find_element(By.CSS_SELECTOR, "#signin-form button[type=submit]").click()


# -- the tests, in order -----------------------------------------------------------------------
def test_a_wrong_token_is_refused(browser: WebDriver, local_stack: LocalStack, shots: Path) -> None:
    browser.get(f"{local_stack.api_url}/")
    sign_in(browser, "inco_not-a-token-of-anyone")
    error = until(browser, lambda d: visible(d, "#signin-error"), 10, "the refusal")
    assert error.text.startswith("token refused:"), error.text
    assert visible(browser, "#view-signin") and not visible(browser, "#nav")
    assert browser.execute_script("return sessionStorage.length + localStorage.length") == 0
    screenshot(browser, shots / "signin.png")


def test_a_job_from_the_form_shows_its_progress_until_it_succeeds(
    browser: WebDriver, local_stack: LocalStack, api: httpx.Client, shots: Path
) -> None:
    sign_in(browser, local_stack.token)
    until(browser, lambda d: visible(d, "#view-leaderboard"), 10, "the leaderboard after sign-in")
    assert local_stack.token not in browser.current_url and browser.get_cookies() == []
    go(browser, "#/jobs")
    form = until(browser, lambda d: visible(d, "#submit-form"), 10, "the submit form")
    until(browser, lambda d: Select(d.find_element(By.ID, "submit-dataset")).options, 10, "the data sets")
    assert (
        Select(browser.find_element(By.ID, "submit-dataset")).first_selected_option.get_attribute("value") == "default"
    )

    sixteen = form.find_element(By.CSS_SELECTOR, "input[name=ratio][value='1:16']")
    sixteen.click()  # no ratio at all: the API refuses, and the page says why
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    message = until(browser, lambda d: visible(d, "#submit-message.error"), 10, "the API's refusal")
    assert message.text.startswith("not submitted:") and "ratios" in message.text and "HTTP 422" in message.text

    sixteen.click()
    Select(browser.find_element(By.ID, "submit-method")).select_by_value("simclr")  # a second row for the board
    Select(browser.find_element(By.ID, "submit-preset")).select_by_value("smoke")
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    link = until(browser, lambda d: visible(d, "#submit-message.ok a"), 10, "the submitted job")
    job_id = link.get_attribute("href").rsplit("/", 1)[1]
    job = api.get(f"/v1/jobs/{job_id}").json()
    assert job["spec"]["method"] == "simclr" and job["spec"]["ratios"] == ["1:16"] and job["spec"]["preset"] == "smoke"

    seen: list[tuple[str, str, float, str]] = []  # (status, stage, fraction, label) each time the row changed
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        now = browser.execute_script(
            "const row = document.querySelector(`tr[data-job-id='${arguments[0]}']`);"
            "if (!row) return null; const bar = row.querySelector('.progress'), p = bar.querySelector('progress');"
            "return [row.dataset.status, bar.dataset.stage, p.value / p.max, bar.textContent];",
            job_id,
        )
        if now and (not seen or tuple(now) != seen[-1]):
            seen.append(tuple(now))
            if now[0] == "running":  # the last running state has the most to show
                screenshot(browser, shots / "jobs.png")
        if now and now[0] in ("succeeded", "failed", "canceled"):
            break
        time.sleep(0.25)
    # the page followed the job by itself (polling): from an empty bar through running to a full one
    assert seen and seen[-1][0] == "succeeded", (seen, api.get(f"/v1/jobs/{job_id}/logs").json()[-5:])
    assert seen[-1][2] == 1 and seen[-1][3] == "done", seen
    assert seen[0][0] in ("queued", "running") and seen[0][2] < 1, seen
    running = [s for s in seen if s[0] == "running"]
    assert running and len(seen) >= 3, seen
    for _, stage, fraction, label in running:  # a stage's bar is its latest epoch of its epochs
        assert label == "starting" or (stage and re.fullmatch(r"epoch (\d+)/(\d+)|starting", label)), label
        if label.startswith("epoch "):
            done, total = map(int, label.split()[1].split("/"))
            assert fraction == done / total
    assert not visible(browser, f"tr[data-job-id='{job_id}'] button")  # no cancel for a finished job
    made["job"] = job_id


def test_the_job_page_shows_results_plots_and_logs(
    browser: WebDriver, local_stack: LocalStack, api: httpx.Client, shots: Path
) -> None:
    job_id = made["job"]
    browser.find_element(By.CSS_SELECTOR, f"tr[data-job-id='{job_id}'] a").click()
    until(browser, lambda d: visible(d, "#view-job") and d.find_element(By.ID, "job-id").text == job_id, 10)
    results = api.get(f"/v1/jobs/{job_id}/results").json()
    assert len(results) == 1
    rows = until(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#job-results tbody tr"), 20, "the results")
    assert len(rows) == 1
    cells = [c.text for c in rows[0].find_elements(By.TAG_NAME, "td")]
    r = results[0]
    assert cells[:5] == [
        r["ratio"],
        r["eval"],
        str(r["seed"]),
        str(r["labelled_images"]),
        f"{r['accuracy'] * 100:.2f} %",
    ]
    assert cells[5:] == [f"{r['per_class_recall'][c] * 100:.2f}" for c in r["classes"]]

    plot_loaded(browser, browser.find_element(By.ID, "job-curves"), api)
    confusion = browser.find_element(By.CSS_SELECTOR, "#job-confusions figure")
    assert confusion.get_attribute("data-src").endswith("confusion.png?ratio=1%3A16&eval=finetune&seed=0")
    plot_loaded(browser, confusion, api)
    plot_loaded(browser, browser.find_element(By.CSS_SELECTOR, "#job-embeddings figure"), api, timeout=120)
    logs = browser.find_elements(By.CSS_SELECTOR, "#job-logs li .msg")
    assert [e.text for e in logs] == [line["message"] for line in api.get(f"/v1/jobs/{job_id}/logs").json()]
    assert logs[-1].text == "succeeded"
    screenshot(browser, shots / "job.png", whole_page=True)


def test_the_leaderboard_shows_the_rows_of_the_api(
    browser: WebDriver, local_stack: LocalStack, api: httpx.Client, shots: Path
) -> None:
    go(browser, "#/leaderboard")
    rows = api.get("/v1/results").json()
    assert {r["variant"] for r in rows} >= {"SimCLR"}
    until(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#board-tables td:not(.empty)")) == len(rows), 20)
    for r in rows:
        table = browser.find_element(
            By.CSS_SELECTOR,
            f"table.board-table[data-dataset='{r['dataset']}'][data-preset='{r['preset']}'][data-eval='{r['eval']}']",
        )
        cell = table.find_element(By.CSS_SELECTOR, f"tr[data-variant='{r['variant']}'] td[data-ratio='{r['ratio']}']")
        assert cell.text == f"{r['mean'] * 100:.2f} ± {r['std'] * 100:.2f} ({r['count']})"
    ratios = [th.text for th in browser.find_elements(By.CSS_SELECTOR, "table.board-table thead th.num")]
    assert ratios == sorted(ratios, key=lambda x: -int(x.split(":")[1]))
    plot_loaded(browser, browser.find_element(By.ID, "figure4"), api)
    screenshot(browser, shots / "leaderboard.png")

    Select(browser.find_element(By.ID, "board-eval")).select_by_value("linear")  # the filter asks the API again
    until(browser, lambda d: "No results yet" in d.find_element(By.ID, "board-tables").text, 10)
    figure = browser.find_element(By.ID, "figure4")
    until(browser, lambda d: figure.get_attribute("data-state") == "missing", 20, "figure 4 without results")
    assert figure.get_attribute("data-src") == "/v1/results/figure4.png?eval=linear"
    detail = api.get("/v1/results/figure4.png", params={"eval": "linear"}).json()["detail"]
    assert figure.find_element(By.CLASS_NAME, "noplot").text == f"no plot yet: {detail}"
    Select(browser.find_element(By.ID, "board-eval")).select_by_value("")


def test_predict_shows_each_image_with_its_class_and_probabilities(
    browser: WebDriver, local_stack: LocalStack, api: httpx.Client, neu_path: Path, shots: Path
) -> None:
    go(browser, "#/models")
    models = api.get("/v1/models").json()
    until(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#models-table tbody tr")) == len(models), 10)
    model = models[-1]  # the oldest: the CLI's smoke job's, or the form's when this file runs alone
    Select(browser.find_element(By.ID, "predict-model")).select_by_value(str(model["id"]))
    browser.execute_script(  # a file dropped on the drop zone joins the list; its x leaves it out
        "const data = new DataTransfer(); data.items.add(new File(['x'], 'dropped.png', {type: 'image/png'}));"
        "document.getElementById('drop').dispatchEvent(new DragEvent('drop', {dataTransfer: data, bubbles: true}));"
    )
    chosen = until(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#chosen li"), 5, "the dropped file")
    assert chosen[0].text.startswith("dropped.png (1 KiB)")
    chosen[0].find_element(By.TAG_NAME, "button").click()
    assert not browser.find_elements(By.CSS_SELECTOR, "#chosen li")
    files = [neu_path / "crazing" / "crazing_1.jpg", neu_path / "scratches" / "scratches_1.jpg"]
    browser.find_element(By.ID, "predict-files").send_keys("\n".join(str(f) for f in files))
    assert [e.text.split(" (")[0] for e in browser.find_elements(By.CSS_SELECTOR, "#chosen li span")] == [
        f.name for f in files
    ]
    browser.find_element(By.CSS_SELECTOR, "#predict-form button[type=submit]").click()
    until(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, ".prediction")) == 2, 60, "two predictions")

    answer = api.post(
        f"/v1/models/{model['id']}/predict",
        files=[("files", (f.name, f.read_bytes(), "image/jpeg")) for f in files],
    ).json()
    cards = browser.find_elements(By.CSS_SELECTOR, ".prediction")
    for card, expected in zip(cards, answer["images"], strict=True):
        assert card.get_attribute("data-file") == expected["file"]
        assert card.find_element(By.CSS_SELECTOR, ".predicted .class").text == expected["predicted"]
        shown = {
            row.get_attribute("data-class"): row.find_element(By.CSS_SELECTOR, "td.num").text
            for row in card.find_elements(By.CSS_SELECTOR, ".probabilities tr")
        }
        assert shown == {c: f"{p * 100:.1f} %" for c, p in expected["probabilities"].items()}
        img = card.find_element(By.TAG_NAME, "img")
        until(browser, lambda d, img=img: d.execute_script("return arguments[0].naturalWidth", img) > 0, 10)
        assert img.get_attribute("src").startswith("blob:")
    screenshot(browser, shots / "models.png", whole_page=True)


def test_a_model_downloads_under_the_name_the_api_gives(browser: WebDriver, api: httpx.Client, tmp_path: Path) -> None:
    browser.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(tmp_path)})
    model = api.get("/v1/models").json()[-1]
    row = browser.find_element(By.CSS_SELECTOR, f"#models-table tr[data-model-id='{model['id']}']")
    row.find_element(By.XPATH, ".//button[text()='PyTorch']").click()
    expected = api.get(f"/v1/models/{model['id']}/file", params={"format": "pytorch"})
    name = expected.headers["content-disposition"].split("filename=")[1].strip('"')
    until(browser, lambda d: (tmp_path / name).is_file() and not list(tmp_path.glob("*.crdownload")), 30, name)
    assert (tmp_path / name).read_bytes() == expected.content


def test_a_data_set_name_with_markup_is_shown_as_text(
    browser: WebDriver, local_stack: LocalStack, api: httpx.Client, neu_path: Path
) -> None:
    refused = api.post("/v1/datasets", json={"name": MARKUP, "path": str(neu_path)})
    assert refused.status_code == 422  # the API refuses such a name; a row in the store can still hold one
    engine = make_engine(local_stack.db_url)
    try:
        with session_scope(engine) as s:
            team = access.find_team(s, name="local")
            access.add_dataset(s, team_id=team.id, name=MARKUP, path=str(neu_path), images=1800, classes=["a", "b"])
    finally:
        engine.dispose()

    go(browser, "#/jobs")
    until(browser, lambda d: visible(d, "#submit-dataset"), 10)

    def datasets(d: WebDriver) -> Select:  # found anew each time: the page fills the list when the API answers
        return Select(d.find_element(By.ID, "submit-dataset"))

    until(browser, lambda d: MARKUP in [o.get_attribute("value") for o in datasets(d).options], 10, "the new name")
    option = next(o for o in datasets(browser).options if o.get_attribute("value") == MARKUP)
    assert option.text.startswith(f"{MARKUP} (1800 images")
    datasets(browser).select_by_value(MARKUP)
    browser.find_element(By.CSS_SELECTOR, "#submit-form button[type=submit]").click()
    message = until(browser, lambda d: visible(d, "#submit-message.error"), 10, "the refusal")
    assert message.text.startswith("not submitted:") and "dataset" in message.text

    go(browser, "#/leaderboard")
    until(browser, lambda d: MARKUP in d.find_element(By.ID, "board-dataset").text, 10)
    no_alert(browser)
    assert browser.execute_script("return document.scripts.length") == 1  # app.js, nothing added
    assert browser.execute_script("return [...document.scripts].map(s => s.src)") == [
        f"{local_stack.api_url}/web/app.js"
    ]


def test_another_team_sees_nothing_and_sign_out_forgets_everything(
    browser: WebDriver, local_stack: LocalStack, shots: Path
) -> None:
    browser.find_element(By.ID, "sign-out").click()
    until(browser, lambda d: visible(d, "#view-signin"), 10)
    assert browser.execute_script("return sessionStorage.length + localStorage.length") == 0
    for box in ("board-tables", "job-results", "job-logs", "predictions"):
        assert browser.execute_script(f"return document.getElementById('{box}').childElementCount") == 0, box
    assert not browser.find_elements(By.CSS_SELECTOR, "#jobs-table tbody tr, #models-table tbody tr")
    go(browser, "#/jobs")
    assert visible(browser, "#view-signin") and not visible(browser, "#view-jobs")

    engine = make_engine(local_stack.db_url)
    try:
        with session_scope(engine) as s:
            other = access.create_token(s, team=access.ensure_team(s, name="other-plant"), scopes=["read", "predict"])
    finally:
        engine.dispose()
    sign_in(browser, other)
    until(browser, lambda d: visible(d, "#view-jobs") and visible(d, "#jobs-empty"), 10, "another team's empty list")
    go(browser, "#/leaderboard")
    until(browser, lambda d: "No results yet" in d.find_element(By.ID, "board-tables").text, 10)
    assert Select(browser.find_element(By.ID, "board-dataset")).options[0].text == "all"
    assert len(Select(browser.find_element(By.ID, "board-dataset")).options) == 1  # none of the local team's
    go(browser, "#/models")
    until(browser, lambda d: visible(d, "#models-empty"), 10)
    browser.find_element(By.ID, "sign-out").click()
    until(browser, lambda d: visible(d, "#view-signin"), 10)

    urls = [browser.current_url, *browser.execute_script("return performance.getEntries().map(e => e.name)")]
    assert not [u for u in urls if local_stack.token in u or other in u]
    problems = [
        e["message"]
        for e in browser.get_log("browser")
        if "Content Security Policy" in e["message"] or "TrustedHTML" in e["message"] or "Uncaught" in e["message"]
    ]
    assert problems == []
