"""The QC page in a real browser: Debian's chromium, headless, driven by selenium through chromium-driver.

The page loads from file:// with no console error, lists every mask, sorts and filters, a click (and a key)
marks a row, the marks survive a reload (localStorage), the exports hold the marks (the downloaded files
and the page's own export functions agree), the YAML is what spinalcordtoolbox/manual-correction reads
(``FILES_SEG`` parsed with PyYAML's safe_load, as manual-correction does), and the round trip
export -> ``init-config --review`` -> config holds exactly the passed and corrected masks.

chromium and chromium-driver are installed with apt-get when absent; the test skips, saying so, only when
apt cannot reach its registry. The driver and browser are stopped by ``driver.quit()`` (selenium started them).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from sacrum_masks.cli import main
from sacrum_masks.qc import run_qc
from test_qc import make_dataset

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1400,1000"]


def _install_chromium() -> None:
    if shutil.which("chromium") and shutil.which("chromedriver"):
        return
    if shutil.which("apt-get") is None:
        pytest.skip("chromium/chromium-driver absent and no apt-get to install them")
    proc = subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", "chromium", "chromium-driver"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        upd = subprocess.run(["apt-get", "update"], capture_output=True, text=True)
        if upd.returncode != 0:
            pytest.skip("apt-get cannot reach its registry to install chromium: " + upd.stderr.strip()[-200:])
        proc = subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", "chromium",
                               "chromium-driver"], capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.fail("apt-get install chromium chromium-driver failed: " + proc.stderr.strip()[-400:])


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    _install_chromium()
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for flag in CHROMIUM_FLAGS:
        opts.add_argument(flag)
    opts.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    opts.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                           "download.prompt_for_download": False})
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
    try:
        driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
        driver.downloads = downloads
        yield driver
    finally:
        driver.quit()


def _visible_keys(driver) -> list[str]:
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('#qc tbody tr'))"
        ".filter(r => r.style.display !== 'none').map(r => r.dataset.key);")


def _row(driver, key):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, f'#qc tbody tr[data-key="{key}"]')


def _click(driver, element) -> None:
    """A real click, after scrolling the element clear of the page's sticky control bar."""
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", element)
    element.click()


def _wait_file(path: Path, timeout: float = 15.0) -> str:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.is_file() and path.stat().st_size > 0:
            return path.read_text(encoding="utf-8")
        time.sleep(0.1)
    raise AssertionError(f"{path.name} was not downloaded")


def test_page_review_export_and_round_trip(tmp_path, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    bids = tmp_path / "bids"
    make_dataset(bids / "ds")
    labels = bids / "ds" / "derivatives" / "labels"
    entries, index = run_qc(labels)
    keys = [e.mask for e in entries]
    key = {e.subject: e.mask for e in entries}

    browser.get(index.as_uri())
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors
    assert _visible_keys(browser) == keys                                  # every mask, worst first
    assert browser.find_element(By.ID, "shown").text == f"{len(keys)} of {len(keys)} shown"

    sort = Select(browser.find_element(By.ID, "sort"))
    sort.select_by_value("name")
    assert _visible_keys(browser) == sorted(keys)
    sort.select_by_value("volume_up")
    vols = {e.mask: e.volume_ml for e in entries}
    assert [vols[k] for k in _visible_keys(browser)] == sorted(vols.values())
    sort.select_by_value("score")
    assert _visible_keys(browser) == keys

    filt = Select(browser.find_element(By.ID, "filter"))
    filt.select_by_value("flagged")
    assert _visible_keys(browser) == [e.mask for e in entries if e.flags]
    assert sorted(_visible_keys(browser)) == sorted([key["06"], key["07"]])
    filt.select_by_value("flag:empty")
    assert _visible_keys(browser) == [key["06"]]
    filt.select_by_value("all")

    # marks: buttons for most, keys for two (select the row by a click on its name, then p / a)
    _click(browser, _row(browser, key["07"]).find_element(By.CSS_SELECTOR, "button.m-fail"))
    for sub in ("01", "02", "04", "05"):
        _click(browser, _row(browser, key[sub]).find_element(By.CSS_SELECTOR, "button.m-pass"))
    _click(browser, _row(browser, key["06"]).find_element(By.CSS_SELECTOR, "td.name"))
    browser.switch_to.active_element.send_keys("a")
    _click(browser, _row(browser, key["08"]).find_element(By.CSS_SELECTOR, "td.name"))
    browser.switch_to.active_element.send_keys("p")
    assert _row(browser, key["07"]).get_attribute("data-decision") == "fail"
    assert _row(browser, key["06"]).find_element(By.CSS_SELECTOR, ".decision").text == "artifact"
    assert browser.find_element(By.ID, "counts").text == "5 pass, 1 fail, 1 artifact, 1 unmarked"
    filt.select_by_value("unmarked")
    assert _visible_keys(browser) == [key["03"]]

    browser.refresh()                                                      # kept in localStorage
    marks = browser.execute_script("return window.sacrumQc.marks();")
    assert {k: v["decision"] for k, v in marks.items()} == {
        key["07"]: "fail", key["01"]: "pass", key["02"]: "pass", key["04"]: "pass", key["05"]: "pass",
        key["06"]: "artifact", key["08"]: "pass"}

    _click(browser, browser.find_element(By.ID, "export-yaml"))
    _click(browser, browser.find_element(By.ID, "export-tsv"))
    yml = _wait_file(browser.downloads / "qc_fail.yml")
    tsv = _wait_file(browser.downloads / "review.tsv")
    assert yml == browser.execute_script("return window.sacrumQc.yaml();")
    assert tsv == browser.execute_script("return window.sacrumQc.tsv();")
    assert yaml.safe_load(yml) == {"FILES_SEG": ["sub-07_T2w.nii.gz"]}
    lines = tsv.splitlines()
    assert lines[0] == "mask\tdecision\tflags\tdate" and len(lines) == 8
    rows = {ln.split("\t")[0]: ln.split("\t") for ln in lines[1:]}
    assert rows[key["07"]][1:3] == ["fail", "volume_outlier,extent"] and rows[key["07"]][3].endswith("Z")
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors
    browser.save_screenshot(str(tmp_path / "page.png"))
    assert (tmp_path / "page.png").stat().st_size > 10_000

    # back into training: sub-07 (fail) corrected by hand as manual-correction does (mask rewritten in place,
    # {"Author", "Date"} appended to its sidecar); sub-03 (no sidecar) is a manual mask found beside them;
    # sub-06 (artifact) stays out; sub-05's mask is gone since the review (one line, left out)
    review = tmp_path / "review.tsv"
    review.write_text(tsv, encoding="utf-8")
    m07 = bids / key["07"]
    side07 = m07.with_name(m07.name.replace(".nii.gz", ".json"))
    meta = json.loads(side07.read_text())
    meta.setdefault("GeneratedBy", [{"Name": "sacrum-masks"}]).append({"Author": "A. Rater", "Date": "2026-12-02"})
    side07.write_text(json.dumps(meta))
    (bids / key["05"]).unlink()
    out = tmp_path / "next.json"
    r = CliRunner().invoke(main, ["init-config", "--review", str(review), "--datasets-path", str(bids),
                                  "--split-validation", "0", "--split-test", "0", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert f"{key['05']}: no longer exists" in r.output
    assert "4 passed, 2 corrected, 1 left out (fail/artifact), 1 missing" in r.output
    config = json.loads(out.read_text())
    assert sorted(config["TRAINING"]) == sorted(key[s] for s in ("01", "02", "04", "08", "07", "03"))
    assert config["VALIDATION"] == config["TESTING"] == []
    import hashlib
    assert config["REVIEW"]["SHA256"] == hashlib.sha256(review.read_bytes()).hexdigest()
    assert config["REVIEW"]["FILE"] == str(review.resolve())
