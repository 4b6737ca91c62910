"""Hypothesis strategies for Ollana's datagrams."""

from __future__ import annotations

from hypothesis import strategies as st

from ollana import wire

node_ids = st.binary(min_size=16, max_size=16)
announces = st.builds(
    wire.Announce,
    node_id=node_ids,
    port=st.integers(1, 65535),
    scheme=st.sampled_from(wire.SCHEMES),
    version=st.text(
        st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp", "Cf", "Co", "Cn", "Zs")),
        max_size=16,
    ),
    fingerprint=st.none() | st.binary(min_size=32, max_size=32),
)
messages = st.one_of(
    st.builds(wire.Probe, node_ids),
    st.builds(wire.Bye, node_ids),
    st.just(wire.LegacyHello()),
    announces,
)
