"""The evaluation harness: accuracy against sequential forward passes for every strategy of `hogwild.strategies`
on one engine (`runner`), the tasks (`tasks`), answer extraction and grading (`grading`), and the
reports (`report`); `hogwild eval` is `cli`."""
