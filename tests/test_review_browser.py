"""The review page in a real headless browser (Debian's chromium + chromedriver through Selenium),
and its HTTP routes through Starlette's test client."""

from __future__ import annotations

import shutil
import socket
import threading
import time

import numpy as np
import pytest

from mmclinic.data import review_queue as rq

REPORTS = ["FINDINGS: Small left pleural effusion. IMPRESSION: Effusion.",
           "FINDINGS: Heart size normal. Seen by Dr. John Smith on 03/04/2021. IMPRESSION: Normal.",
           "FINDINGS: Right upper lobe consolidation. IMPRESSION: Pneumonia.",
           "FINDINGS: Pacemaker in place. IMPRESSION: No acute finding."]


@pytest.fixture()
def queue_db(tmp_path):
    """Four flagged pairs from a CSV source (PNG images written here), queued as score queues them."""
    from PIL import Image

    rows = ["pair_id,image_path,report_text"]
    for i, text in enumerate(REPORTS):
        ramp = np.tile(np.linspace(0, 255, 48, dtype=np.uint8), (48, 1))
        Image.fromarray(np.roll(ramp, 7 * i, axis=1)).save(tmp_path / f"im{i}.png")
        rows.append(f'p{i},im{i}.png,"{text}"')
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    db = f"sqlite:///{tmp_path / 'scores.db'}"
    rq.enqueue(rq.engine_for(db), scoring_run_id="run-1", model_name="tiny", model_version=1, threshold=0.5,
               origin=f"csv:{tmp_path / 'pairs.csv'}", pair_ids=[f"p{i}" for i in range(4)],
               report_ids=[""] * 4, scores=[4.0, 3.0, 2.0, 1.0], match_scores=[0.1] * 4, flagged=[True] * 4)
    return db


def test_routes(queue_db):
    from starlette.testclient import TestClient

    from mmclinic.serve.review import create_app

    client = TestClient(create_app(queue_db))
    assert "mmclinic review" in client.get("/").text
    q = client.get("/api/queue").json()
    assert [i["pair_id"] for i in q["items"]] == ["p0", "p1", "p2", "p3"] and q["progress"]["pending"] == 4
    item = client.get(f"/api/item/{q['items'][1]['id']}").json()
    assert "John Smith" not in item["report_text"] and "Heart size normal" in item["report_text"]
    full = client.get(f"/image/{q['items'][0]['id']}")
    narrow = client.get(f"/image/{q['items'][0]['id']}?low=0.4&high=0.6")
    from mmclinic.phi import pixel_text

    if pixel_text.tesseract_version() is None:  # a user's image is never shown unredacted
        assert full.status_code >= 400 and "tesseract-ocr" in full.text
    else:
        assert full.headers["content-type"] == "image/png" and full.content != narrow.content
    assert client.get("/image/999").status_code == 404
    bad = client.post("/api/decide", json={"pair_id": "p0", "status": "maybe", "reviewer": "ana"})
    assert bad.status_code == 400 and "maybe" in bad.json()["error"]
    assert client.post("/api/decide", json={"pair_id": "zz", "status": "dismissed", "reviewer": "ana"}
                       ).status_code == 400
    ok = client.post("/api/decide", json={"pair_id": "p0", "status": "dismissed", "reviewer": "ana", "note": "dup"})
    assert ok.json()["progress"]["dismissed"] == 1
    assert client.get("/decisions.csv").text.splitlines() == ["pair_id,status,reviewer,note", "p0,dismissed,ana,dup"]
    assert [h["via"] for h in rq.history(queue_db)] == ["page"]


def test_dataset_origin(dataset):
    """Pairs queued from a dataset show the stored PNG and the de-identified reports.parquet text."""
    from mmclinic.artifacts import DatasetDir
    from mmclinic.display import display_image
    from mmclinic.serve.review import item_image, item_text

    rows = DatasetDir(dataset).split_rows("test")
    row = {"origin": f"dataset:{dataset}", "pair_id": rows["image_id"][0], "image_key": rows["image_id"][0],
           "report_key": rows["report_id"][0]}
    assert item_text(row) == rows["text"][0]
    assert display_image(item_image(row)).size[0] > 0


def _browser(tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("no headless browser: apt-get install chromium chromium-driver")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path / 'chrome-profile'}"):
        opts.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=opts)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_three_decisions_in_the_browser(queue_db, tmp_path):
    import uvicorn

    from mmclinic.serve.review import create_app

    browser = _browser(tmp_path)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(queue_db, reviewer="ana"), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(100):
            if server.started:
                break
            time.sleep(0.05)
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait

        wait = WebDriverWait(browser, 20)
        browser.get(f"http://127.0.0.1:{port}/")
        body = browser.find_element(By.TAG_NAME, "body")
        wait.until(lambda b: body.get_attribute("data-pair") == "p0")
        assert "Effusion" in browser.find_element(By.ID, "report").text
        assert browser.find_element(By.ID, "progress").text == "0 of 4 decided"
        src = browser.find_element(By.ID, "image").get_attribute("src")
        browser.execute_script("const s = document.getElementById('low'); s.value = 30; s.dispatchEvent("
                               "new Event('input'))")
        assert browser.find_element(By.ID, "image").get_attribute("src") != src
        wait.until(lambda b: b.execute_script("const i = document.getElementById('image');"
                                              " return i.complete && i.naturalWidth > 0"))
        # a note typed in the field goes with the first decision
        note = browser.find_element(By.ID, "note")
        note.send_keys("report of another study")
        browser.find_element(By.ID, "btn-m").click()
        wait.until(lambda b: body.get_attribute("data-saved") == "1" and body.get_attribute("data-pair") == "p1")
        for n, key in enumerate(("c", "d"), start=2):
            body.send_keys(key)
            wait.until(lambda b, n=n: body.get_attribute("data-saved") == str(n))
        assert browser.find_element(By.ID, "progress").text == "3 of 4 decided"
        body.send_keys("p")  # back one: nothing written
        wait.until(lambda b: body.get_attribute("data-pair") == "p2")
    finally:
        browser.quit()
        server.should_exit = True
        thread.join(10)
    got = {r["pair_id"]: (r["status"], r["reviewer"], r["note"]) for r in rq.queue_rows(queue_db)}
    assert got == {"p0": ("confirmed_mismatch", "ana", "report of another study"),
                   "p1": ("confirmed_match", "ana", ""), "p2": ("dismissed", "ana", ""),
                   "p3": ("pending", None, None)}
    assert len(rq.history(queue_db)) == 3
