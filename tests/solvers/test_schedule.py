"""The random layered graphs: the same graph for the same arguments, denser on request."""

import pytest

from solvers.schedule import random_layered_graph


def test_more_edges_are_added_to_the_same_graph():
    sparse, order = random_layered_graph(200, seed=4, width=8, fan_in=4, skip=0.3)
    dense, same_order = random_layered_graph(200, seed=4, width=8, fan_in=4, skip=0.3, edges=900)
    assert order == same_order and dense.number_of_edges() == 900
    assert set(sparse.edges) <= set(dense.edges)
    assert all(sparse.nodes[v] == dense.nodes[v] for v in order)
    position = {v: t for t, v in enumerate(order)}
    assert all(position[u] < position[v] for u, v in dense.edges)


@pytest.mark.parametrize("skip", [0.0, 0.3, 1.0])
def test_an_edge_count_the_layers_cannot_hold_is_refused(skip):
    with pytest.raises(ValueError, match="at most"):
        random_layered_graph(12, seed=1, width=4, fan_in=1, skip=skip, edges=12 * 12)
