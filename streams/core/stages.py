"""Which journey stage a touchpoint belongs to (§2).

Stages are ordered: awareness < consideration < purchase < retention < advocacy;
"furthest stage" means furthest along that order. Touchpoints that say nothing
about the customer's stage (identify, errors, app opens, email bounces) have
no stage (``NO_STAGE``) and never move it.
"""

from __future__ import annotations

from typing import Any

from msgspec import UNSET

STAGES = ("awareness", "consideration", "purchase", "retention", "advocacy")
AWARENESS, CONSIDERATION, PURCHASE, RETENTION, ADVOCACY = range(5)
NO_STAGE = -1

_BY_TYPE = {
    "ad_click": AWARENESS,
    "social_interaction": AWARENESS,
    "email_sent": AWARENESS,
    "email_open": AWARENESS,
    "product_view": CONSIDERATION,
    "search": CONSIDERATION,
    "email_click": CONSIDERATION,
    "store_visit": CONSIDERATION,
    "cart_add": PURCHASE,
    "cart_remove": PURCHASE,
    "checkout_start": PURCHASE,
    "payment_failed": PURCHASE,
    "purchase": PURCHASE,
    "pos_purchase": PURCHASE,
    "support_contact": RETENTION,
    "unsubscribe": RETENTION,
    "referral": ADVOCACY,
    "identify": NO_STAGE,
    "error": NO_STAGE,
    "app_open": NO_STAGE,
    "email_bounce": NO_STAGE,
}

_AWARENESS_PATHS = ("/landing", "/home", "/welcome", "/lp/")
_PURCHASE_PATHS = ("/cart", "/checkout", "/basket", "/pay")
_RETENTION_PATHS = ("/account", "/orders", "/order/", "/track", "/help", "/support", "/returns")
_PURCHASE_SCREENS = frozenset({"cart", "checkout", "payment", "basket"})
_RETENTION_SCREENS = frozenset(
    {"orders", "order", "account", "tracking", "help", "returns", "support"}
)
_AWARENESS_SCREENS = frozenset({"home", "onboarding", "welcome"})
# Promoter / very satisfied / effortless answers are advocacy; the rest retention.
_ADVOCACY_SCORE = {"nps": lambda s: s >= 9, "csat": lambda s: s >= 5, "ces": lambda s: s <= 2}


def _path(url: str) -> str:
    scheme = url.find("://")
    if scheme >= 0:
        slash = url.find("/", scheme + 3)
        url = url[slash:] if slash >= 0 else "/"
    end = len(url)
    for sep in "?#":
        i = url.find(sep)
        if 0 <= i < end:
            end = i
    return url[:end].lower() or "/"


def _page_stage(url: str) -> int:
    path = _path(url)
    if path == "/" or path.startswith(_AWARENESS_PATHS):
        return AWARENESS
    if path.startswith(_PURCHASE_PATHS):
        return PURCHASE
    if path.startswith(_RETENTION_PATHS):
        return RETENTION
    return CONSIDERATION


def _get(props: Any, name: str) -> Any:
    value = props.get(name) if isinstance(props, dict) else getattr(props, name, None)
    return None if value is UNSET else value


STAGE_BY_TYPE = _BY_TYPE  # the event types whose stage does not depend on properties

_page_cache: dict[str, int] = {}


def stage_of(event_type: str, props: Any) -> int:
    """Stage index of a touchpoint (``NO_STAGE`` if it has none); ``props`` is a dict or Struct."""
    stage = _BY_TYPE.get(event_type)
    if stage is not None:
        return stage
    if event_type == "page_view":
        url = _get(props, "url") or "/"
        stage = _page_cache.get(url)
        if stage is None:
            if len(_page_cache) > 100_000:
                _page_cache.clear()
            stage = _page_cache[url] = _page_stage(url)
        return stage
    if event_type == "screen_view":
        screen = (_get(props, "screen") or "").lower()
        if screen in _PURCHASE_SCREENS:
            return PURCHASE
        if screen in _RETENTION_SCREENS:
            return RETENTION
        return AWARENESS if screen in _AWARENESS_SCREENS else CONSIDERATION
    if event_type == "survey_response":
        kind, score = _get(props, "survey"), _get(props, "score")
        good = _ADVOCACY_SCORE.get(kind)
        return ADVOCACY if good is not None and score is not None and good(score) else RETENTION
    if event_type == "review":
        rating = _get(props, "rating")
        return ADVOCACY if rating is not None and rating >= 4 else RETENTION
    # An event type added by a new schema and not mapped here yet: neutral.
    return NO_STAGE
