"""The API's own documentation, as its readers use it: `/docs` in a real headless Chromium (the
distribution's package, driven by Selenium through the distribution's chromedriver) with no network
beyond loopback, "Authorize" with an API key, "Try it out" -> "Execute" on `GET /v1/models`; and the
document itself true: every `$ref` resolves, and a body that the published schema of chat,
completions, embeddings or key creation allows is never refused as invalid (schemathesis'
`positive_data_acceptance`: no 400/422) nor answered with a 5xx.

Both run against a gateway of their own (auth on, its own key database) in front of the shared
mesh's stages.
"""

from __future__ import annotations

import json
import re
import secrets
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import jsonschema
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, assume, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import positive_data_acceptance

from tests.helpers import MODEL_ID, GatewayProcess

pytestmark = [
    pytest.mark.xdist_group("mesh"),  # on the worker that already runs the session meshes
    pytest.mark.parametrize("mesh", ["embedded"], indirect=True),  # the document is the gateway's alone
]

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
LM = "meshserve/tiny-llama-chat"
# Per operation and pass: a fixed count. Hypothesis is derandomized, yet runs do not all send the same
# bodies (schemathesis draws some values from a randomness of its own).
EXAMPLES = 12
REQUEST_TIMEOUT_S = 30.0


@pytest.fixture(scope="module")
def gateway(mesh, tmp_path_factory):
    """A gateway with auth on in front of the shared mesh's stages; yields it and its admin token."""
    tmp = tmp_path_factory.mktemp("api-docs")
    admin = "msk_admin_" + secrets.token_urlsafe(32)
    env = {
        "MESHSERVE_GATEWAY_AUTH": "true",
        "MESHSERVE_ADMIN_TOKEN": admin,
        "MESHSERVE_GATEWAY_DATABASE_URL": f"sqlite:///{tmp / 'gateway.db'}",  # the fuzzed keys stay here
    }
    process = GatewayProcess(mesh, tmp / "gateway.log", env)
    yield process, admin
    process.stop()


def new_key(url: str, admin: str, scopes: list[str]) -> str:
    reply = httpx.post(
        url + "/admin/keys", json={"name": "docs", "scopes": scopes}, headers={"authorization": f"Bearer {admin}"}
    )
    assert reply.status_code == 201, reply.text
    return reply.json()["token"]


# -- the document ---------------------------------------------------------------------------------


def refs(node) -> set[str]:
    """Every `$ref` value under `node`."""
    found: set[str] = set()
    if isinstance(node, dict):
        for key, value in node.items():
            found |= {value} if key == "$ref" and isinstance(value, str) else refs(value)
    elif isinstance(node, list):
        for item in node:
            found |= refs(item)
    return found


def resolves(document: dict, ref: str) -> bool:
    """A local JSON pointer (`#/a/b`) that names a node of the document."""
    if not ref.startswith("#/"):
        return False  # the document is self-contained: nothing to fetch
    node = document
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def test_the_document_is_public_and_every_reference_resolves(gateway):
    process, _ = gateway
    reply = httpx.get(process.url + "/openapi.json", timeout=30)  # no key
    assert reply.status_code == 200, reply.text
    document = reply.json()
    dangling = sorted(r for r in refs(document) if not resolves(document, r))
    assert not dangling, dangling
    for path, method in [("/v1/chat/completions", "post"), ("/v1/completions", "post"),
                         ("/v1/embeddings", "post"), ("/admin/keys", "post"), ("/models/{model_path}", "post")]:  # fmt: skip
        assert "requestBody" in document["paths"][path][method], (method, path)


# -- accepted by the schema -> accepted by the server ----------------------------------------------

# The operations whose request schemas must say what the server enforces; the model each runs.
OPERATIONS = {"/v1/chat/completions": LM, "/v1/completions": LM, "/v1/embeddings": MODEL_ID, "/admin/keys": None}


def as_a_model_takes_it(body: dict, model: str) -> dict:
    """A generated body aimed at a real model, with the values that are the model's own limits (no
    JSON schema of the route can know them: GET /v1/models/{id} says them) brought within them: few
    new tokens (also keeps the run short), the embedding size, its vocabulary, its prompts. The body
    stays one the schema allows."""
    body = {**body, "model": model}
    # JSON Schema's integers include 3.0: schemathesis sends some as floats.
    for name, most in (("max_tokens", 4), ("max_completion_tokens", 4), ("min_tokens", 4), ("dimensions", 384)):
        if isinstance(body.get(name), (int, float)):
            body[name] = min(int(body[name]), most)
    if isinstance(body.get("logit_bias"), dict):
        body["logit_bias"] = {str(int(k) % 100): v for k, v in body["logit_bias"].items()}
    if isinstance(body.get("stop_token_ids"), list):
        body["stop_token_ids"] = [int(t) % 100 for t in body["stop_token_ids"]]
    body.pop("prompt_name", None)  # MiniLM has none
    if isinstance(body.get("input"), list) and body["input"] and not isinstance(body["input"][0], str):
        rows = body["input"] if isinstance(body["input"][0], list) else [body["input"]]
        rows = [[int(t) % 1000 + 1000 for t in row[:64]] for row in rows]  # MiniLM's ids: 30522, 512 tokens
        body["input"] = rows if isinstance(body["input"][0], list) else rows[0]
    return body


# What a model refuses by its own limits (its context length, texts per request, characters per text).
MODEL_LIMIT = re.compile(r"takes at most|the limit is")


def within_the_models_limits(ctx, response, case) -> bool | None:
    """positive_data_acceptance, but a body over the model's own limits (a long generated prompt,
    tools rendered into it) may be refused, as the model's card says (GET /v1/models/{id})."""
    if response.status_code in (400, 413) and MODEL_LIMIT.search(response.text):
        return None
    return positive_data_acceptance(ctx, response, case)


def names_a_tool_it_lacks(body) -> bool:
    """A named `tool_choice` that is not one of `tools`: refused (400), and no JSON schema can say
    that one field's value must be another's."""
    if not isinstance(body, dict) or not isinstance(body.get("tool_choice"), dict):
        return False
    name = body["tool_choice"]["function"]["name"]
    return name not in {(t.get("function") or {}).get("name") for t in body.get("tools") or []}


def body_validator(document: dict, operation) -> jsonschema.Validator:
    """The operation's published body schema, its references resolved in the document."""
    schema = operation.definition.raw["requestBody"]["content"]["application/json"]["schema"]
    return jsonschema.Draft202012Validator({**schema, "components": document["components"]})


def fuzz(operation, url: str, headers: dict, model: str | None, sent: list[int]) -> None:
    """EXAMPLES valid bodies of one operation, each sent as generated (an unknown model: 404 once
    validated) and, for a model route, to the real model; raises what the checks found. A body is
    checked against the schema first: near 2**63 the generator's integers can round past `maximum`."""
    validator = body_validator(operation.schema.raw_schema, operation)

    @settings(
        max_examples=EXAMPLES,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(schemathesis.GenerationMode.POSITIVE).filter(
        lambda case: not names_a_tool_it_lacks(case.body)))  # fmt: skip
    def call(case) -> None:
        assume(validator.is_valid(case.body))
        checks = [not_a_server_error, positive_data_acceptance]
        case.call_and_validate(base_url=url, headers=headers, checks=checks, timeout=REQUEST_TIMEOUT_S)
        sent[0] += 1
        if model is not None:
            case.body = as_a_model_takes_it(case.body, model)
            checks = [not_a_server_error, within_the_models_limits]
            case.call_and_validate(base_url=url, headers=headers, checks=checks, timeout=REQUEST_TIMEOUT_S)
            sent[0] += 1

    call()


def test_bodies_their_schemas_allow_are_accepted(gateway):
    process, admin = gateway
    headers = {"authorization": f"Bearer {admin}"}
    schema = schemathesis.openapi.from_url(process.url + "/openapi.json", timeout=30)
    failures: dict[str, str] = {}
    sent: dict[str, int] = {}
    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.method.upper() != "POST" or operation.path not in OPERATIONS:
            continue
        count = [0]
        try:
            fuzz(operation, process.url, headers, OPERATIONS[operation.path], count)
        except (Exception, BaseExceptionGroup) as exc:  # every operation runs; each failure is reported
            failures[operation.label] = str(exc)
        sent[operation.label] = count[0]
    report = "\n\n".join(f"== {label}\n{text}" for label, text in failures.items())
    assert len(sent) == len(OPERATIONS) and all(sent.values()), (sent, report)
    assert not failures, f"{len(failures)} operation(s) failed:\n{report}\n\ngateway log:\n{process.log()[-2000:]}"


# -- /docs in a browser ---------------------------------------------------------------------------


@pytest.fixture
def browser(tmp_path, monkeypatch):
    """Headless Chromium from the distribution's packages, driven through its chromedriver (an
    explicit Service: Selenium Manager downloads nothing), with every host but loopback unresolvable
    and its network log kept."""
    if not Path(CHROMIUM).exists() or not Path(CHROMEDRIVER).exists():
        pytest.skip(f"no {CHROMIUM} / {CHROMEDRIVER}: install the distribution's chromium and chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager: never download a browser or a driver
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'chromium'}", "--window-size=1400,1000",
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
    ):  # fmt: skip
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER),
                              options=options)  # fmt: skip
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def requested_urls(driver) -> list[str]:
    """Every URL the page asked for so far (Chromium's network log, drained)."""
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


def test_docs_page_authorizes_and_runs_a_call_offline(gateway, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    process, admin = gateway
    key = new_key(process.url, admin, ["read"])  # what GET /v1/models needs
    wait = WebDriverWait(browser, 60)
    browser.get(process.url + "/docs")
    wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, ".swagger-ui .auth-wrapper .authorize"))).click()
    field = wait.until(ec.visibility_of_element_located((By.CSS_SELECTOR, ".modal-ux input")))
    field.send_keys(key)
    browser.find_element(By.CSS_SELECTOR, ".modal-ux .auth-btn-wrapper .authorize").click()
    wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, ".modal-ux .btn-done"))).click()

    operation = wait.until(ec.element_to_be_clickable((By.ID, "operations-openai-list_models_v1_models_get")))
    operation.find_element(By.CSS_SELECTOR, ".opblock-summary").click()
    wait.until(
        ec.element_to_be_clickable((By.CSS_SELECTOR, "#operations-openai-list_models_v1_models_get .try-out__btn"))
    ).click()
    wait.until(
        ec.element_to_be_clickable((By.CSS_SELECTOR, "#operations-openai-list_models_v1_models_get .execute"))
    ).click()
    status = wait.until(
        ec.visibility_of_element_located(
            (
                By.CSS_SELECTOR,
                "#operations-openai-list_models_v1_models_get .live-responses-table tr.response .response-col_status",
            )
        )
    )
    body = browser.find_element(
        By.CSS_SELECTOR,
        "#operations-openai-list_models_v1_models_get .live-responses-table tr.response .response-col_description",
    ).text
    assert status.text.strip() == "200", (status.text, body)
    assert MODEL_ID in body  # the models list itself, shown in the page

    urls = requested_urls(browser)
    origin = urlsplit(process.url).netloc
    assert any(u.endswith("/openapi.json") for u in urls), urls
    assert any("/static-offline-docs/" in u for u in urls), urls  # Swagger UI's assets, from the gateway
    network = [u for u in urls if urlsplit(u).scheme in ("http", "https", "ws", "wss")]  # not data:, chrome:
    outside = [u for u in network if urlsplit(u).netloc != origin]
    assert not outside, outside  # no CDN, no validator badge, nothing off loopback
