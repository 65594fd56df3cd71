"""One GET against Binance's REST API (or the local feed server, which speaks it), its failures as one error."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request


class ExchangeError(RuntimeError):
    """The exchange refused or failed a request; the message is its answer."""


def get_json(base_url: str, path: str, params: dict, api_key: str | None = None, timeout: float = 10.0):
    """The decoded JSON answer to GET base_url/path?params."""
    request = urllib.request.Request(f"{base_url.rstrip('/')}{path}?{urllib.parse.urlencode(params)}")
    if api_key:
        request.add_header("X-MBX-APIKEY", api_key)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raise ExchangeError(f"HTTP {exc.code}: {exc.read().decode('utf-8', 'replace')[:300]}") from None
    except (urllib.error.URLError, TimeoutError) as exc:
        raise ExchangeError(f"no answer from {base_url}: {exc}") from None
