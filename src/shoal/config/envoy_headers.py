"""Envoy's header matchers, string matchers and headers to add → the model's, shared by
routes, filters and health checks.

Internal to :mod:`shoal.config.envoy`.
"""

from __future__ import annotations

from typing import Literal

from envoy.config.core.v3 import base_pb2
from google.protobuf.message import Message

from shoal.config.envoy_fields import Ctx, choice, compile_regex, required
from shoal.config.model import AppendAction, HeaderMatcher, HeaderValueOption, StringMatch

_HEADER_MATCH_KINDS: dict[str, Literal["exact", "prefix", "suffix", "contains"]] = {
    "exact_match": "exact",
    "prefix_match": "prefix",
    "suffix_match": "suffix",
    "contains_match": "contains",
}
PRESENT = StringMatch("present")


def header_matcher(matcher: Message, ctx: Ctx) -> HeaderMatcher:
    """No match specifier means "header present", as in Envoy."""
    name = required(str(matcher.name).lower(), ctx.at("name"), "name")
    kind = matcher.WhichOneof("header_match_specifier")
    invert = bool(matcher.invert_match)
    if kind in _HEADER_MATCH_KINDS:
        match = StringMatch(_HEADER_MATCH_KINDS[kind], str(getattr(matcher, kind)))
    elif kind == "safe_regex_match":
        regex = compile_regex(matcher.safe_regex_match, ctx.at(kind))
        match = StringMatch("regex", regex.pattern, regex=regex)
    elif kind == "string_match":
        match = string_match(matcher.string_match, ctx.at(kind))
    else:
        return HeaderMatcher(name, PRESENT, invert, kind is None or bool(matcher.present_match))
    return HeaderMatcher(name, match, invert)


def string_match(matcher: Message, ctx: Ctx) -> StringMatch:
    """Envoy ignores ``ignore_case`` for safe_regex; so does the model."""
    kind = matcher.WhichOneof("match_pattern")
    if kind is None:
        raise ctx.error("one of exact, prefix, suffix, contains or safe_regex is required")
    ignore_case = bool(matcher.ignore_case)
    if kind == "safe_regex":
        regex = compile_regex(matcher.safe_regex, ctx.at(kind))
        return StringMatch("regex", regex.pattern, ignore_case, regex)
    return StringMatch(kind, str(getattr(matcher, kind)), ignore_case)


_APPEND_ACTIONS: dict[int, AppendAction] = {
    base_pb2.HeaderValueOption.APPEND_IF_EXISTS_OR_ADD: "append_if_exists_or_add",
    base_pb2.HeaderValueOption.ADD_IF_ABSENT: "add_if_absent",
    base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD: "overwrite_if_exists_or_add",
    base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS: "overwrite_if_exists",
}


def headers_to_add(owner: Message, field: str, ctx: Ctx) -> tuple[HeaderValueOption, ...]:
    """HeaderValueOption list; the deprecated ``append`` bool maps to append_action."""
    options = []
    for index, option in enumerate(getattr(owner, field)):
        here = ctx.at(field, index)
        key = required(str(option.header.key).lower(), here.at("header", "key"), "header key")
        action = choice(_APPEND_ACTIONS, option, "append_action", here)
        if option.HasField("append"):
            if action != "append_if_exists_or_add":
                raise here.at("append").error("append and append_action are exclusive")
            action = (
                "append_if_exists_or_add" if option.append.value else "overwrite_if_exists_or_add"
            )
        options.append(HeaderValueOption(key, str(option.header.value), action))
    return tuple(options)
