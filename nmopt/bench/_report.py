"""Old home of the shared report writers; they live in :mod:`nmopt._report` (below prune and
bench). Kept only while imports move over."""

from nmopt._report import (  # noqa: F401
    MISSING,
    Column,
    add_output_arguments,
    environment,
    format_table,
    json_text,
    markdown_table,
    print_table,
    write_json,
    write_plot,
    write_text,
)
