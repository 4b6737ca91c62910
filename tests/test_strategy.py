"""How client mode orders the servers for a request: LeastWait (ttft) by the servers' reports
and this client's own requests, and the older orders (Classic)."""

from __future__ import annotations

import random
from collections import Counter

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from ollana.interfaces import IStrategy
from ollana.peers import EJECT_AFTER, EJECT_SECONDS, Peer, PeerPool
from ollana.state import ServerState
from ollana.strategy import AFFINITY_MEMORY, DEFAULT, STRATEGIES, Classic, LeastWait, strategy

START = 1000.0
M = "llama3.2:latest"
OTHER = "qwen3:8b"
THIRD = "gemma3:1b"
KEY = "0123456789abcdef0123456789abcdef"
ORDERS = 1000  # orders made to see how the power of two choices shares the first place


def state(m: int = 0, parallel: int = 2, loaded: tuple[str, ...] = (M,),
          **running: int) -> ServerState:  # fmt: skip
    """A report: m requests in flight for M (none waiting), slots, the loaded models, and
    requests in flight for other models (other=OTHER, third=THIRD)."""
    counts = {M: m, OTHER: running.get("other", 0), THIRD: running.get("third", 0)}
    models = {name: (count, 0) for name, count in counts.items() if count}
    return ServerState(parallel=parallel, loaded=frozenset(loaded), models=models)


def names(order: list[tuple[Peer, str]]) -> list[tuple[str, str]]:
    """An order as (server name, reason) pairs."""
    return [(peer.host.partition(".")[0], reason) for peer, reason in order]


class StrategyCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.pool = PeerPool(self.clock, ttl=15)
        self.strategy = LeastWait(self.pool, random.Random(7))

    def peer(self, name: str, report: ServerState | None = None, latency: float = 0.001) -> Peer:
        peer = self.pool.add_static(f"{name}.example", 11435)
        self.pool.check_succeeded(peer, latency)
        peer.state = report
        return peer

    def sent(self, peer: Peer, model: str, count: int = 1) -> None:
        """This client sent peer count requests for model since its last report (as
        PoolRouter.started counts them)."""
        peer.unreported += count
        peer.unreported_models[model] = peer.unreported_models.get(model, 0) + count

    def order(self, model: str | None = M, key: str | None = None) -> list[tuple[str, str]]:
        return names(self.strategy.order(model, key))

    def first(self, model: str | None = M, key: str | None = None) -> tuple[str, str]:
        return self.order(model, key)[0]

    def firsts(self, count: int = ORDERS, model: str | None = M) -> Counter[str]:
        """How often each server came first in count orders."""
        return Counter(self.first(model)[0] for _ in range(count))


class TierTests(StrategyCase):
    def test_each_tier_in_order(self) -> None:
        # Named against the order, so that no tie-break by name can give it.
        home = self.peer("f", state(m=1))  # served this conversation; a slot free
        self.peer("e", state(m=1))  # warm, a slot free
        self.peer("d", state(m=2))  # warm, every slot taken, nobody waiting
        self.peer("c", state(loaded=()))  # nothing loaded, idle
        self.peer("b", state(m=4))  # warm, two waiting for a slot
        self.peer("a", state(loaded=(OTHER,), other=1))  # another model loaded and busy
        self.strategy.served(home, M, KEY)
        self.assertEqual(
            self.order(M, KEY),
            [("f", "affinity"), ("e", "warm"), ("d", "least-loaded"), ("c", "cold"),
             ("b", "least-loaded"), ("a", "cold")],
        )  # fmt: skip

    def test_warm_before_cold_whatever_the_latency(self) -> None:
        self.peer("a", state(loaded=()), latency=0.0001)
        self.peer("b", state(loaded=(OTHER, M)), latency=0.05)
        self.assertEqual(self.order(), [("b", "warm"), ("a", "cold")])
        self.assertEqual(self.order(OTHER), [("b", "warm"), ("a", "cold")])

    def test_slots_come_from_the_report(self) -> None:
        self.peer("a", state(m=1, parallel=1))
        self.peer("b", state(m=3, parallel=4))
        self.assertEqual(self.order(), [("b", "warm"), ("a", "least-loaded")])

    def test_among_warm_servers_the_fewest_requests_per_slot_first(self) -> None:
        self.peer("a", state(m=3, parallel=4))
        self.peer("b", state(m=1, parallel=4))
        self.assertEqual(self.order(), [("b", "warm"), ("a", "warm")])

    def test_a_cold_load_goes_where_it_evicts_what_others_also_have(self) -> None:
        self.peer("a", state(loaded=(OTHER,)))  # idle, the only copy of OTHER
        self.peer("b", state(loaded=(THIRD,)))  # idle; c has that model too
        self.peer("c", state(loaded=(THIRD,), third=1))
        self.assertEqual(self.order(), [("b", "cold"), ("a", "cold"), ("c", "cold")])
        self.assertEqual(self.firsts(100), Counter({"b": 100}), "not a tie for chance")

    def test_an_idle_server_without_room_is_cold_unless_others_have_what_it_would_evict(
        self,
    ) -> None:
        self.peer("a", ServerState(max_loaded=1, loaded=frozenset({OTHER})))  # the only copy
        self.peer("b", ServerState(max_loaded=1, loaded=frozenset({THIRD})))
        self.peer("c", state(loaded=(THIRD,), third=1))  # has THIRD too
        self.peer("d", state(m=4, parallel=1))
        self.assertEqual(
            self.order(), [("b", "cold"), ("d", "least-loaded"), ("a", "cold"), ("c", "cold")]
        )

    def test_no_server(self) -> None:
        self.assertEqual(self.strategy.order(M, KEY), [])
        self.assertEqual(self.strategy.order(None, None), [])


class AffinityTests(StrategyCase):
    def test_the_conversations_server_first_while_it_has_a_free_slot(self) -> None:
        home = self.peer("b", state(m=3, parallel=4))
        self.peer("a", state(m=0, parallel=4))
        self.strategy.served(home, M, KEY)
        self.assertEqual(self.order(M, KEY), [("b", "affinity"), ("a", "warm")])
        self.assertEqual(self.order(M, None), [("a", "warm"), ("b", "warm")])
        self.assertEqual(self.order(M, "another conversation"), [("a", "warm"), ("b", "warm")])

    def test_affinity_gives_way_when_its_server_has_no_free_slot(self) -> None:
        home = self.peer("a", state(m=1, parallel=1))
        self.peer("b", state(m=0, parallel=1))
        self.strategy.served(home, M, KEY)
        self.assertEqual(self.order(M, KEY), [("b", "warm"), ("a", "least-loaded")])
        home.state = state(m=0, parallel=1)
        self.assertEqual(self.order(M, KEY), [("a", "affinity"), ("b", "warm")])
        self.sent(home, M)  # this client's own request takes the slot
        self.assertEqual(self.order(M, KEY), [("b", "warm"), ("a", "least-loaded")])

    def test_the_last_server_of_each_conversation(self) -> None:
        a = self.peer("a", state())
        b = self.peer("b", state())
        self.strategy.served(a, M, "one")
        self.strategy.served(b, M, "two")
        self.assertEqual(self.first(M, "one"), ("a", "affinity"))
        self.assertEqual(self.first(M, "two"), ("b", "affinity"))
        self.strategy.served(b, M, "one")  # the conversation moved (a was busy, say)
        self.assertEqual(self.first(M, "one"), ("b", "affinity"))

    def test_nothing_is_remembered_without_a_key_or_a_peer(self) -> None:
        a = self.peer("a", state())
        self.peer("b", state())
        self.strategy.served(a, M, None)
        self.strategy.served(object(), M, KEY)
        self.assertNotIn("affinity", [reason for _, reason in self.order(M, KEY)])

    def test_a_server_that_is_not_eligible_is_no_home(self) -> None:
        home = self.peer("a", state())
        self.peer("b", state())
        self.strategy.served(home, M, KEY)
        self.pool.suspect(home, "connection refused")
        self.assertEqual(self.order(M, KEY), [("b", "warm")])

    def test_memory_is_bounded_and_the_least_recently_served_go_first(self) -> None:
        self.peer("a", state())
        home = self.peer("b", state())
        for n in range(AFFINITY_MEMORY):
            self.strategy.served(home, M, f"conversation {n}")
        self.strategy.served(home, M, "conversation 0")  # served again: remembered longest
        self.strategy.served(home, M, "one too many")
        for key in ("conversation 0", "conversation 2", f"conversation {AFFINITY_MEMORY - 1}",
                    "one too many"):  # fmt: skip
            self.assertEqual(self.first(M, key), ("b", "affinity"), key)
        self.assertNotEqual(self.first(M, "conversation 1")[1], "affinity")
        for n in range(AFFINITY_MEMORY):
            self.strategy.served(home, M, f"later {n}")
        remembered = [key for key in ["conversation 0", "one too many", "later 0"]
                      if self.first(M, key)[1] == "affinity"]  # fmt: skip
        self.assertEqual(remembered, ["later 0"])


class UnreportedTests(StrategyCase):
    def test_a_clients_own_requests_since_the_report_fill_slots(self) -> None:
        a = self.peer("a", state(parallel=1))
        b = self.peer("b", state(parallel=1))
        self.sent(a, M)
        self.assertEqual(self.order(), [("b", "warm"), ("a", "least-loaded")])
        self.sent(b, M)
        self.sent(b, M)
        self.assertEqual(self.order(), [("a", "least-loaded"), ("b", "least-loaded")])
        a.state, a.unreported, a.unreported_models = state(parallel=1), 0, {}  # a new report
        self.assertEqual(self.order(), [("a", "warm"), ("b", "least-loaded")])

    def test_requests_for_a_model_being_loaded_count_as_warm_ones(self) -> None:
        loading = self.peer("a", state(parallel=1, loaded=()))
        self.peer("b", state(parallel=1, loaded=()))
        self.sent(loading, M)  # the report does not list it yet: a short queue there
        self.assertEqual(self.order(), [("a", "least-loaded"), ("b", "cold")])
        self.sent(loading, M, 2)  # two wait there now
        self.assertEqual(self.order(), [("b", "cold"), ("a", "least-loaded")])
        self.peer("c", state(m=2, parallel=1))  # warm, one waiting
        self.assertEqual(self.order()[-1], ("a", "least-loaded"), "the deepest queue last")

    def test_requests_for_another_model_make_a_server_busy(self) -> None:
        self.peer("a", state(loaded=()))
        self.peer("b", state(m=4))  # warm but a deep queue
        c = self.peer("c", state(loaded=()))
        self.assertEqual({name for name, _ in self.order()[:2]}, {"a", "c"})
        self.sent(c, OTHER)
        self.assertEqual(self.order(), [("a", "cold"), ("b", "least-loaded"), ("c", "cold")])

    def test_servers_without_a_report(self) -> None:
        self.peer("a")
        self.peer("b", state(parallel=1))
        c = self.peer("c")
        self.peer("d", state(m=4, parallel=1))
        self.sent(c, OTHER)
        self.assertEqual(
            self.order(), [("b", "warm"), ("a", "cold"), ("d", "least-loaded"), ("c", "cold")]
        )

    def test_servers_without_a_report_take_what_this_client_sends_in_turn(self) -> None:
        a = self.peer("a")
        b = self.peer("b")
        self.sent(a, M, 2)  # one slot taken (the least a server has), one waiting
        self.assertEqual(self.order(), [("b", "cold"), ("a", "least-loaded")])
        self.sent(b, M, 3)
        self.assertEqual(self.order(), [("a", "least-loaded"), ("b", "least-loaded")])


class ModelNoneTests(StrategyCase):
    def test_reported_servers_first_the_least_busy_first(self) -> None:
        self.peer("a")
        self.peer("b", state(m=3, other=2))
        self.peer("c", state(m=1))
        self.assertEqual(
            self.order(None), [("c", "least-loaded"), ("b", "least-loaded"), ("a", "cold")]
        )


class EligibilityTests(StrategyCase):
    def test_unhealthy_servers_as_a_last_resort_last_good_first(self) -> None:
        a = self.peer("a", state())
        self.clock.advance(10)
        b = self.peer("b", state(m=4))
        self.pool.suspect(a, "connection refused")
        self.assertEqual(self.order(M, KEY), [("b", "least-loaded")])
        self.pool.suspect(b, "connection refused")
        self.assertEqual(self.order(M, KEY), [("b", "unhealthy"), ("a", "unhealthy")])

    def test_ejected_servers_are_left_out_unless_all_are(self) -> None:
        a = self.peer("a", state(m=3, parallel=4))
        b = self.peer("b", state(m=0, parallel=4))
        for _ in range(EJECT_AFTER):
            self.pool.request_failed(b, "HTTP 500")
        self.assertEqual(self.order(), [("a", "warm")])
        for _ in range(EJECT_AFTER):
            self.pool.request_failed(a, "HTTP 500")
        self.assertEqual(self.order(), [("b", "warm"), ("a", "warm")], "never none (panic)")
        self.clock.advance(EJECT_SECONDS)
        self.assertEqual(self.order(), [("b", "warm"), ("a", "warm")])
        self.assertFalse(self.pool.ejected(a) or self.pool.ejected(b))

    def test_servers_that_list_the_model_only(self) -> None:
        a = self.peer("a", state(loaded=()))
        self.peer("b", state(m=4))
        a.models = frozenset({M})
        self.assertEqual(self.order(), [("a", "cold")])


class PowerOfTwoTests(StrategyCase):
    def test_equal_servers_share_the_first_place(self) -> None:
        self.peer("a", state())
        self.peer("b", state())
        firsts = self.firsts()
        self.assertEqual(set(firsts), {"a", "b"})
        for name in "ab":
            self.assertTrue(0.4 * ORDERS < firsts[name] < 0.6 * ORDERS, firsts)

    def test_check_latencies_that_differ_by_a_lans_noise_do_not_decide(self) -> None:
        # A client that always chose the one with the lower check latency would send
        # every first request to it, as would every other client.
        self.peer("a", state(), latency=0.0011)
        self.peer("b", state(), latency=0.0010)
        firsts = self.firsts()
        for name in "ab":
            self.assertTrue(0.4 * ORDERS < firsts[name] < 0.6 * ORDERS, firsts)

    def test_the_more_loaded_of_the_two_drawn_never_goes_first(self) -> None:
        # Of three warm servers, the least loaded wins whenever it is drawn (2/3 of the
        # time), the most loaded never; the rest of each order is by load.
        self.peer("a", state(m=2, parallel=4))
        self.peer("b", state(m=1, parallel=4))
        self.peer("c", state(m=0, parallel=4))
        firsts: Counter[str] = Counter()
        for _ in range(ORDERS):
            order = self.order()
            firsts[order[0][0]] += 1
            rest = [name for name, _ in order[1:]]
            self.assertEqual(rest, sorted(rest, reverse=True), order)
        self.assertEqual(firsts["a"], 0)
        self.assertTrue(0.58 * ORDERS < firsts["c"] < 0.75 * ORDERS, firsts)
        self.assertEqual(firsts["b"] + firsts["c"], ORDERS)

    def test_only_the_best_tier_is_drawn_from(self) -> None:
        self.peer("a", state(m=2, parallel=1))
        self.peer("b", state(m=0, parallel=1))
        self.peer("c", state(loaded=()))
        self.assertEqual(self.firsts(100), Counter({"b": 100}))

    def test_the_same_seed_gives_the_same_orders(self) -> None:
        self.peer("a", state())
        self.peer("b", state())
        self.peer("c", state())
        orders = []
        for _ in range(2):
            self.strategy = LeastWait(self.pool, random.Random(42))
            orders.append([self.first() for _ in range(50)])
        self.assertEqual(orders[0], orders[1])
        self.assertGreater(len(set(orders[0])), 1)


class InterfaceTests(StrategyCase):
    def test_the_strategies_provide_the_interface(self) -> None:
        self.assertTrue(verifyObject(IStrategy, LeastWait(self.pool)))
        for name in STRATEGIES[1:]:
            self.assertTrue(verifyObject(IStrategy, Classic(self.pool, name)))

    def test_strategy_by_name(self) -> None:
        self.assertEqual((DEFAULT, STRATEGIES[0]), ("ttft", "ttft"))
        self.assertIsInstance(strategy(self.pool, DEFAULT), LeastWait)
        for name in STRATEGIES:
            made = strategy(self.pool, name)
            self.assertEqual(made.name, name)
            self.assertIs(made.pool, self.pool)  # type: ignore[attr-defined]
            self.assertTrue(verifyObject(IStrategy, made))
        self.assertIsInstance(strategy(self.pool, "round-robin"), Classic)


class ClassicTests(StrategyCase):
    """The older orders, which know nothing of the servers' reports."""

    def test_fastest(self) -> None:
        self.peer("a", state(loaded=()), latency=0.5)
        self.peer("b", state(m=9, parallel=1), latency=0.01)  # a deep queue: not seen
        classic = Classic(self.pool, "fastest")
        self.assertEqual(names(classic.order(M, KEY)), [("b", "fastest"), ("a", "fastest")])

    def test_least_connections(self) -> None:
        a = self.peer("a", state(m=9, parallel=1), latency=0.5)
        b = self.peer("b", state(), latency=0.01)
        a.active, b.active = 0, 2
        classic = Classic(self.pool, "least-connections")
        self.assertEqual(names(classic.order(M, None)),
                         [("a", "least-connections"), ("b", "least-connections")])  # fmt: skip

    def test_round_robin(self) -> None:
        self.peer("a", latency=0.5)
        self.peer("b", latency=0.01)
        classic = Classic(self.pool, "round-robin")
        firsts = [names(classic.order(None, None)) for _ in range(3)]
        self.assertEqual(
            firsts,
            [[("a", "round-robin"), ("b", "round-robin")],
             [("b", "round-robin"), ("a", "round-robin")],
             [("a", "round-robin"), ("b", "round-robin")]],
        )  # fmt: skip

    def test_no_affinity(self) -> None:
        self.peer("a", latency=0.01)
        b = self.peer("b", latency=0.5)
        classic = Classic(self.pool, "fastest")
        classic.served(b, M, KEY)
        self.assertEqual(names(classic.order(M, KEY)), [("a", "fastest"), ("b", "fastest")])

    def test_unhealthy_servers_as_a_last_resort(self) -> None:
        a = self.peer("a", latency=0.01)
        self.pool.suspect(a, "connection refused")
        self.assertEqual(names(Classic(self.pool, "fastest").order(None, None)),
                         [("a", "fastest")])  # fmt: skip
