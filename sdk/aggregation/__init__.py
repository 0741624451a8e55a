"""Aggregator-side math: streaming FedAvg over named tensors and RSEA expert assignment."""

from .fedavg import RunningMean, fedavg
from .rsea import (
    AssignmentConstraints,
    InfeasibleAssignmentError,
    assign_module,
    assignment_lists,
    assignment_objective,
    random_assignment,
    relevance,
    selection_probs,
    solve_assignment,
)

__all__ = [
    "AssignmentConstraints",
    "InfeasibleAssignmentError",
    "RunningMean",
    "assign_module",
    "assignment_lists",
    "assignment_objective",
    "fedavg",
    "random_assignment",
    "relevance",
    "selection_probs",
    "solve_assignment",
]
