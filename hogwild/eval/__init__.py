"""The evaluation harness: accuracy against sequential forward passes for single, hogwild:N, groupthink:N, vote:N
and best:N on one engine (`runner`), the tasks (`tasks`), answer extraction and grading (`grading`), and the
reports (`report`); `hogwild eval` is `cli`."""
