"""Task metrics that need no model."""

from qlora_cli.evaluate import sql_execution_match


def test_sql_execution_match_compares_results_not_strings():
    schema = "table books (title, author, genre, pages, year)"
    reference = "SELECT title FROM books WHERE genre = 'poetry';"
    assert sql_execution_match(schema, reference, "select title from books where genre='poetry'")
    assert not sql_execution_match(schema, reference, "SELECT title FROM books WHERE genre = 'drama';")
    assert not sql_execution_match(schema, reference, "SELECT author FROM books WHERE genre = 'poetry';")
    assert not sql_execution_match(schema, reference, "SELEC title FROM books")
    ordered = "SELECT title FROM books ORDER BY pages DESC LIMIT 1;"
    assert not sql_execution_match(schema, ordered, "SELECT title FROM books ORDER BY pages ASC LIMIT 1;")
