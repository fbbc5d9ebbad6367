"""Forward Email TXT syntax: aliases, every prefix, regexes with substitution, catch-alls,
plus tags, several records, precedence, bounded input, and bad entries collected."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from mailfort.relay.fwdtxt import MAX_TARGETS, Action, Decision, Rules, parse


def rules(*values: str) -> Rules:
    return parse([f"forward-email={v}" for v in values])


def forward(*targets: str) -> Decision:
    return Decision(Action.FORWARD, targets)


# -- records --------------------------------------------------------------------------------


def test_alias_to_address() -> None:
    r = rules("hello:user@gmail.com")
    assert r.errors == ()
    assert r.configured
    assert r.resolve("hello") == forward("user@gmail.com")
    assert r.resolve("other") is None


def test_other_records_are_ignored() -> None:
    r = parse(["v=spf1 include:_spf.example -all", "forward-email-site-verification=abc", "x"])
    assert not r.configured
    assert r.errors == ()
    assert r.resolve("hello") is None


def test_prefix_is_case_insensitive_and_trimmed() -> None:
    r = parse(["  Forward-Email=hello:user@gmail.com  "])
    assert r.resolve("hello") == forward("user@gmail.com")


def test_entries_split_over_several_records() -> None:
    r = parse(
        [
            "forward-email=hello:a@x.org,",
            "v=spf1 -all",
            "forward-email=,,hello:b@y.org , world:c@z.org",
        ]
    )
    assert r.errors == ()
    assert r.resolve("hello") == forward("a@x.org", "b@y.org")
    assert r.resolve("world") == forward("c@z.org")


def test_local_parts_are_case_insensitive() -> None:
    r = rules("Hello:User@Gmail.com")
    assert r.resolve("HELLO") == forward("User@gmail.com")  # remote local part keeps its case


def test_idn_target_domain_becomes_a_label() -> None:
    assert rules("hi:joerg@bücher.de").resolve("hi") == forward("joerg@xn--bcher-kva.de")


def test_alias_to_domain_keeps_the_local_part() -> None:
    r = rules("hello:example.net")
    assert r.resolve("hello") == forward("hello@example.net")
    assert r.resolve("hello+news") == forward("hello+news@example.net")


def test_alias_to_webhook() -> None:
    r = rules("hook:https://hooks.example/in?x=1")
    assert r.resolve("hook") == forward("https://hooks.example/in?x=1")
    assert r.resolve("hook+tag") == forward("https://hooks.example/in?x=1")


def test_duplicate_targets_are_removed() -> None:
    r = rules("a:x@y.org", "a:x@y.org", "a:X@Y.org")
    assert r.resolve("a") == forward("x@y.org", "X@y.org")


# -- prefixes -------------------------------------------------------------------------------


def test_every_alias_prefix() -> None:
    r = rules("!quiet:user@gmail.com", "!!busy:user@gmail.com", "!!!gone:user@gmail.com")
    assert r.errors == ()
    assert r.resolve("quiet") == Decision(Action.DROP)
    assert r.resolve("busy") == Decision(Action.TEMPFAIL)
    assert r.resolve("gone") == Decision(Action.REJECT)


def test_prefix_without_target() -> None:
    r = rules("!quiet", "!!busy", "!!!gone")
    assert r.errors == ()
    assert r.resolve("quiet") == Decision(Action.DROP)
    assert r.resolve("busy") == Decision(Action.TEMPFAIL)
    assert r.resolve("gone") == Decision(Action.REJECT)


def test_every_regex_prefix() -> None:
    r = rules("!/^q/", "!!/^b/:x@y.org", "!!!/^g/")
    assert r.errors == ()
    assert r.resolve("quiet") == Decision(Action.DROP)
    assert r.resolve("busy") == Decision(Action.TEMPFAIL)
    assert r.resolve("gone") == Decision(Action.REJECT)
    assert r.resolve("other") is None


def test_regex_target_side_prefixes() -> None:
    r = rules("/^q/:!", "/^b/:!!", "/^g/:!!!")
    assert r.errors == ()
    assert r.resolve("quiet") == Decision(Action.DROP)
    assert r.resolve("busy") == Decision(Action.TEMPFAIL)
    assert r.resolve("gone") == Decision(Action.REJECT)


def test_disabled_alias_does_not_fall_through_to_the_catch_all() -> None:
    r = rules("!old:me@x.org", "everything@x.org")
    assert r.resolve("old") == Decision(Action.DROP)
    assert r.resolve("new") == forward("everything@x.org")


def test_a_matching_prefix_wins_over_earlier_forwards() -> None:
    """Forward Email's order: the first matching '!' entry decides, wherever it is."""
    r = rules("hello:a@x.org", "/^h/:b@x.org", "!!!/^hel/", "!hello")
    assert r.resolve("hello") == Decision(Action.REJECT)
    assert r.resolve("help") == Decision(Action.REJECT)
    assert r.resolve("hi") == forward("b@x.org")


def test_prefixed_alias_with_plus_tag() -> None:
    assert rules("!!!gone").resolve("gone+x") == Decision(Action.REJECT)


# -- regexes --------------------------------------------------------------------------------


def test_regex_with_substitution() -> None:
    r = rules("/^(support|info)$/:user+$1@gmail.com")
    assert r.errors == ()
    assert r.resolve("support") == forward("user+support@gmail.com")
    assert r.resolve("INFO") == forward("user+info@gmail.com")
    assert r.resolve("sales") is None


def test_firstname_lastname_example_from_the_faq() -> None:
    r = rules(r"/^([A-Za-z]+)+\.([A-Za-z]+)+$/:$1.$2@company.com")
    assert r.errors == ()
    assert r.resolve("Jane.Doe") == forward("jane.doe@company.com")
    assert r.resolve("janedoe") is None


def test_webhook_substitution_is_percent_encoded() -> None:
    r = rules("/^(.*?)$/:https://example.com/webhook?username=$1")
    assert r.resolve("alice") == forward("https://example.com/webhook?username=alice")
    # atext allows &, = and / in a local part: they must not reshape the URL.
    assert r.resolve("a&admin=1/x") == forward(
        "https://example.com/webhook?username=a%26admin%3D1%2Fx"
    )


def test_replacement_patterns() -> None:
    r = rules(
        "/^(a)(b)(c)(d)(e)(f)(g)(h)(i)(j)$/:$10-$1$2-$&@x.org",
        "/^(z)(q)?$/:$1$2$$-$9@y.org",
    )
    assert r.errors == ()
    assert r.resolve("abcdefghij") == forward("j-ab-abcdefghij@x.org")
    # $2 did not participate (empty); $9 does not exist (kept literally); $$ is "$".
    assert r.resolve("z") == forward("z$-$9@y.org")


def test_regex_flags() -> None:
    r = rules("/^Sales$/gi:s@x.org", "/^Ops$/g:o@x.org", "/^Dev$/i:d@x.org", "/^QA$/ig:q@x.org")
    assert r.errors == ()
    for local, target in [
        ("sales", "s@x.org"),
        ("OPS", "o@x.org"),
        ("dev", "d@x.org"),
        ("qa", "q@x.org"),
    ]:
        assert r.resolve(local) == forward(target)


def test_regex_is_unanchored_like_test() -> None:
    assert rules("/sup/:s@x.org").resolve("mysupport") == forward("s@x.org")


def test_regex_with_commas_and_slashes_inside() -> None:
    r = rules(r"/^a{1,3}[,/]b\/c$/:t@x.org,other:o@x.org")
    assert r.errors == ()
    assert r.resolve("aa/b/c") == forward("t@x.org")
    assert r.resolve("a,b/c") == forward("t@x.org")
    assert r.resolve("other") == forward("o@x.org")


def test_regex_and_alias_targets_add_up() -> None:
    r = rules("hello:a@x.org", "/^hel/:b@x.org", "/^zzz/:c@x.org")
    assert r.resolve("hello") == forward("a@x.org", "b@x.org")


def test_regex_matches_the_local_part_without_the_tag() -> None:
    r = rules("/^news$/:me@x.org")
    assert r.resolve("news+daily") == forward("me+daily@x.org")


def test_bad_substitution_result_is_rejected() -> None:
    r = rules("/^(.*)$/:$1@x.org")
    assert r.resolve("ok") == forward("ok@x.org")
    # "a..b" is not a valid dot-atom: the rule matched but can deliver nowhere.
    assert r.resolve("a..b") == Decision(Action.REJECT)


def test_regex_target_cannot_be_turned_into_an_action_by_the_sender() -> None:
    r = rules("/^(.*)$/:$1@x.org")
    assert r.resolve("!!!x") == forward("!!!x@x.org")


def test_pathological_regex_runs_in_linear_time() -> None:
    """Nested quantifiers that make a backtracking engine (Python's re, JavaScript's)
    take about 2**n steps on a near-miss; n = 200 here would never finish there.
    RE2 answers in time linear in the input, so this simply completes."""
    evil = [
        r"/^([A-Za-z]+)+\.([A-Za-z]+)+$/:$1.$2@company.com",  # Forward Email's FAQ example
        r"/^(a+)+$/:x@y.org",
        r"/^(a|a)*b$/:x@y.org",
        r"/^(.*a){12}$/:x@y.org",
    ]
    r = rules(*evil)
    assert r.errors == ()
    for local in ["a" * 200 + "!", "a" * 254 + "!", "A" * 120 + "." + "a" * 120 + "!"]:
        assert r.resolve(local) is None
    assert r.resolve("a" * 200) == forward("x@y.org")


# -- catch-all ------------------------------------------------------------------------------


def test_catch_all_address() -> None:
    r = rules("hello:a@x.org", "everyone@y.org")
    assert r.resolve("hello") == forward("a@x.org")
    assert r.resolve("anybody") == forward("everyone@y.org")


def test_several_catch_alls() -> None:
    r = parse(["forward-email=a@x.org,b@y.org", "forward-email=https://hook.example/all"])
    assert r.resolve("z") == forward("a@x.org", "b@y.org", "https://hook.example/all")


def test_catch_all_domain_keeps_the_local_part() -> None:
    r = rules("example.net")
    assert r.resolve("Jane") == forward("jane@example.net")
    assert r.resolve("jane+Tag") == forward("jane+Tag@example.net")


def test_catch_all_applies_only_when_nothing_specific_matched() -> None:
    r = rules("/^team-/:team@x.org", "all@x.org")
    assert r.resolve("team-a") == forward("team@x.org")
    assert r.resolve("solo") == forward("all@x.org")


# -- plus tags ------------------------------------------------------------------------------


def test_plus_tag_travels_to_the_target() -> None:
    r = rules("hello:user@gmail.com")
    assert r.resolve("hello+shopping") == forward("user+shopping@gmail.com")


def test_plus_tag_replaces_the_targets_own_tag() -> None:
    r = rules("hello:user+a@gmail.com")
    assert r.resolve("hello") == forward("user+a@gmail.com")
    assert r.resolve("hello+b") == forward("user+b@gmail.com")


def test_plus_tag_keeps_its_case_and_everything_after_the_first_plus() -> None:
    assert rules("x@y.org").resolve("a+Big+Deal") == forward("x+Big+Deal@y.org")


def test_empty_plus_tag_adds_nothing() -> None:
    assert rules("hello:user@gmail.com").resolve("hello+") == forward("user@gmail.com")


def test_plus_tag_too_long_for_the_target_is_dropped() -> None:
    r = rules("hello:" + "u" * 60 + "@x.org")
    assert r.resolve("hello+" + "t" * 10) == forward("u" * 60 + "@x.org")


def test_local_part_that_is_only_a_tag_matches_nothing() -> None:
    assert rules("all@x.org").resolve("+tag") is None


# -- limits ---------------------------------------------------------------------------------


def test_at_most_ten_targets_per_alias() -> None:
    r = rules(*(f"hello:u{i}@x.org" for i in range(12)))
    assert r.resolve("hello") == forward(*(f"u{i}@x.org" for i in range(MAX_TARGETS)))
    assert len(r.errors) == 2
    assert all("more than 10 targets" in e for e in r.errors)


def test_at_most_ten_catch_all_targets() -> None:
    r = rules(*(f"u{i}@x.org" for i in range(11)))
    assert len(r.resolve("z").targets) == MAX_TARGETS  # type: ignore[union-attr]
    assert len(r.errors) == 1


def test_resolve_caps_targets_added_by_regexes() -> None:
    r = rules(*(f"/^h/:r{i}@x.org" for i in range(8)), *(f"hello:a{i}@x.org" for i in range(8)))
    decision = r.resolve("hello")
    assert decision is not None and len(decision.targets) == MAX_TARGETS


def test_too_many_regexes() -> None:
    r = rules(*(f"/^r{i}$/:x@y.org" for i in range(40)))
    assert r.resolve("r31") == forward("x@y.org")
    assert r.resolve("r32") is None
    assert len(r.errors) == 8


def test_regex_too_long() -> None:
    r = rules("/^" + "a" * 300 + "$/:x@y.org")
    assert r.errors and "longer than" in r.errors[0]


def test_regex_too_big_for_the_memory_budget() -> None:
    r = rules("/^(a{100}){100}$/:x@y.org")
    assert len(r.errors) == 1
    assert r.resolve("a") is None


def test_huge_records_are_cut_at_an_entry_boundary() -> None:
    many = ",".join(f"alias{i}:target{i}@example.org" for i in range(2000))
    r = rules(many)
    assert any("exceed" in e for e in r.errors)
    assert r.resolve("alias0") == forward("target0@example.org")
    assert r.resolve("alias1999") is None


def test_too_many_entries() -> None:
    r = rules(",".join(f"a{i}:t@x.org" for i in range(300)))
    assert r.resolve("a255") == forward("t@x.org")
    assert r.resolve("a256") is None
    assert any("256 entries" in e for e in r.errors)


def test_overlong_local_part_matches_nothing() -> None:
    r = rules("all@x.org")
    assert r.resolve("a" * 256) is None
    assert r.resolve("") is None


# -- bad entries ----------------------------------------------------------------------------


def test_bad_entries_are_collected_and_skipped() -> None:
    bad = [
        "hello:not an address",
        "hi:http://insecure.example/hook",
        "ip:192.0.2.1",
        "/unterminated:x@y.org",
        "/(?=look)ahead/:x@y.org",
        "/abc/x:x@y.org",
        "/abc/m:x@y.org",
        "!!!!four",
        "nothing:",
        "bareword",
        "bad alias:x@y.org",
        "plus+alias:x@y.org",
        "/^x$/",
        "https://user:pw@hook.example/x",
        "hi:https://",
        "/$/:$1",
    ]
    r = parse(["forward-email=" + ",".join(bad) + ",good:ok@x.org"])
    assert r.resolve("good") == forward("ok@x.org")
    assert len(r.errors) == len(bad), r.errors
    for local in ["hello", "hi", "ip", "four", "nothing", "bareword", "x", "abc"]:
        assert r.resolve(local) is None


def test_unterminated_regex_does_not_swallow_later_records() -> None:
    r = parse(["forward-email=/abc", "forward-email=later:x@y.org"])
    assert r.resolve("later") == forward("x@y.org")
    assert len(r.errors) == 1


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(max_size=60), max_size=4), st.text(max_size=80))
def test_parse_and_resolve_never_raise(values: list[str], local: str) -> None:
    r = parse(["forward-email=" + v for v in values])
    decision = r.resolve(local)
    assert decision is None or isinstance(decision, Decision)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.sampled_from(
            [
                "!",
                "!!",
                "!!!",
                "/",
                "/^",
                "$/",
                ":",
                ",",
                "a",
                "b",
                "@x.org",
                "(",
                ")",
                "+",
                "$1",
                "https://h.example/",
                "\\",
                "[",
                "]",
                "{1,2}",
                ".",
                "*",
                "x.org",
                "i",
                "g",
            ]
        ),
        max_size=30,
    ).map("".join),
    st.sampled_from(["a", "b", "ab+c", "aaa", "x", "A+B"]),
)
def test_grammar_fragments_never_raise(value: str, local: str) -> None:
    r = parse(["forward-email=" + value])
    decision = r.resolve(local)
    if decision is not None and decision.action is Action.FORWARD:
        assert 0 < len(decision.targets) <= MAX_TARGETS
        assert all(t.startswith("https://") or "@" in t for t in decision.targets)
