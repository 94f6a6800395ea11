"""Chained page hashes: full pages only, one hash names a whole prefix, the same value in
every process (a router hashes prompts the same way), incremental extension."""

from __future__ import annotations

import os
import subprocess
import sys

import pdserve
from pdserve.engine.page_hash import hash_seed, page_hashes, salted_seed

SEED = hash_seed("fingerprint-a", 4)
TOKENS = list(range(100, 118))  # four full pages of 4 and a partial one


def test_only_full_pages_are_hashed():
    assert len(page_hashes(TOKENS, 4, SEED)) == 4
    assert page_hashes(TOKENS[:3], 4, SEED) == []


def test_a_hash_names_the_whole_prefix():
    base = page_hashes(TOKENS, 4, SEED)
    changed = list(TOKENS)
    changed[5] += 1  # page 1
    other = page_hashes(changed, 4, SEED)
    assert other[0] == base[0]
    assert all(a != b for a, b in zip(other[1:], base[1:], strict=True))
    # The same page after a different history hashes differently.
    assert page_hashes(TOKENS[4:8], 4, SEED)[0] != base[1]
    assert len(set(base)) == 4


def test_seed_separates_models_and_page_sizes():
    seeds = {hash_seed("fingerprint-a", 4), hash_seed("fingerprint-b", 4), hash_seed("a", 8)}
    assert len(seeds) == 3
    assert page_hashes(TOKENS, 4, SEED) != page_hashes(TOKENS, 4, hash_seed("fingerprint-b", 4))


def test_known_hashes_are_extended_not_recomputed():
    full = page_hashes(TOKENS, 4, SEED)
    assert page_hashes(TOKENS, 4, SEED, known=full[:2]) == full
    assert page_hashes(TOKENS, 4, SEED, known=[11, 22])[:2] == [11, 22]  # trusted as given
    assert page_hashes(TOKENS[:8], 4, SEED, known=full) == full[:2]


def test_hashes_are_equal_in_a_fresh_process_with_another_hash_seed():
    code = (
        "from pdserve.engine.page_hash import hash_seed, page_hashes, salted_seed;"
        f"print(page_hashes({TOKENS!r}, 4, hash_seed('fingerprint-a', 4)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONHASHSEED": "12345", "PYTHONPATH": os.path.dirname(pdserve.__path__[0])},
        timeout=60,
    ).stdout
    assert out.strip() == str(page_hashes(TOKENS, 4, SEED))


def test_large_token_ids_hash_without_overflow():
    big = [2**40 + i for i in range(8)]
    assert len(page_hashes(big, 4, SEED)) == 2


def test_hash_values_are_pinned():
    """Workers and routers of different versions must agree: a change here is a protocol
    change."""
    seed = hash_seed("m", 16)
    assert seed == 7502651784953195004
    assert page_hashes(list(range(32)), 16, seed) == [10184582982597774467, 17472381616408106146]


def test_a_salt_changes_every_page_hash_and_no_salt_changes_none():
    assert salted_seed(SEED, None) == SEED  # unsalted pages hash as before salts existed
    plain = page_hashes(TOKENS, 4, SEED)
    salted = {salt: page_hashes(TOKENS, 4, salted_seed(SEED, salt)) for salt in ("a", "b", "")}
    assert not set(salted["a"]) & set(plain)  # no page shared, the first one included
    assert not set(salted["a"]) & set(salted["b"])
    assert salted[""][0] != plain[0]  # an empty salt is a salt (clients' "" never gets here)
    assert salted["a"] == page_hashes(TOKENS, 4, salted_seed(SEED, "a"))  # stable
    assert salted_seed(hash_seed("fingerprint-b", 4), "a") != salted_seed(SEED, "a")
    assert salted_seed(SEED, "\ud800") != SEED  # any str: a lone surrogate does not raise


def test_salted_hash_values_are_pinned():
    """A router hashes salted prompts as workers do: a change here is a protocol change."""
    seed = salted_seed(hash_seed("m", 16), "tenant-a")
    assert seed == 2023442851788310540
    assert page_hashes(list(range(32)), 16, seed) == [9579786180272869347, 6648279770576533674]
