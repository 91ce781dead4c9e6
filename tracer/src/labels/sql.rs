//! SQL statements reduced to their kind and main table (`SELECT products`,
//! `INSERT orders`): enough to tell queries apart, nothing of their literals or
//! parameters.
//!
//! The statement is read as tokens — words, quoted identifiers, parentheses, and
//! everything else (literals, numbers, operators, parameters) as an opaque token that is
//! never kept. When the text was cut by the end of the captured bytes, the last token may
//! be partial and is dropped: a label never carries half an identifier. A statement whose
//! needed part lies beyond the cut is labelled `KIND …` (`SELECT …`); one whose kind is
//! cut is `…`; one that does not start with a keyword is `?`.

use super::text::CUT;

/// Longest keyword taken as a statement's kind (`REFRESH`, `CHECKPOINT`, `DEALLOCATE`).
const MAX_KIND: usize = 16;

/// Statement kinds that follow the CTEs of a WITH.
const MAIN_KINDS: &str = "SELECT INSERT UPDATE DELETE MERGE VALUES TABLE";

/// What CREATE, DROP and ALTER may be followed by before their object's kind.
const DDL_MODIFIERS: &str = "OR REPLACE TEMP TEMPORARY UNLOGGED GLOBAL LOCAL UNIQUE";

/// Object kinds of CREATE, DROP and ALTER: a known keyword, never a name from the SQL.
const OBJECTS: &str = "TABLE INDEX VIEW SEQUENCE SCHEMA FUNCTION PROCEDURE ROUTINE TRIGGER TYPE EXTENSION \
                       DATABASE ROLE USER GROUP DOMAIN POLICY PUBLICATION SUBSCRIPTION RULE AGGREGATE COLLATION \
                       CONVERSION OPERATOR SERVER TABLESPACE STATISTICS CAST LANGUAGE TRANSFORM OWNED SYSTEM \
                       DEFAULT MATERIALIZED FOREIGN EVENT TEXT ACCESS LARGE";

/// Object kinds that take a second word, and the second words (`MATERIALIZED VIEW`,
/// `FOREIGN TABLE`, `EVENT TRIGGER`, `TEXT SEARCH`, `ACCESS METHOD`, `LARGE OBJECT`,
/// `DEFAULT PRIVILEGES`).
const TWO_WORD_OBJECTS: &str = "MATERIALIZED FOREIGN EVENT TEXT ACCESS LARGE DEFAULT";
const SECOND_WORDS: &str = "VIEW TABLE DATA TRIGGER SEARCH METHOD OBJECT PRIVILEGES";

/// Whether `word` is one of the space-separated keywords of `list`, in any case.
fn is_one_of(word: &[u8], list: &str) -> bool {
    list.split_ascii_whitespace().any(|keyword| word.eq_ignore_ascii_case(keyword.as_bytes()))
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token<'a> {
    /// An unquoted word: a keyword or an identifier.
    Word(&'a [u8]),
    /// The text of a quoted identifier, its doubled quotes undone.
    Quoted(Vec<u8>),
    Open,
    Close,
    Dot,
    /// `;`: the end of the statement.
    End,
    /// A literal, a number, a parameter, an operator: passed over, never kept.
    Other,
}

/// What stands where the label wants a table.
#[derive(Debug, PartialEq, Eq)]
enum Found {
    Table(Vec<u8>),
    /// The statement has none there (`SELECT 1`).
    Absent,
    /// The text was cut before it.
    Cut,
}

/// The label of the first statement of `sql`; `complete` is false when the text was
/// cut by the end of the captured bytes.
pub fn label(sql: &[u8], complete: bool) -> Vec<u8> {
    let mut tokens = Tokens { sql, pos: 0, complete };
    let kind = loop {
        match tokens.next() {
            Some(Token::Open) => continue,
            Some(Token::Word(word)) => break word,
            None if tokens.cut() => return CUT.to_string().into_bytes(),
            _ => return b"?".to_vec(),
        }
    };
    if kind.len() > MAX_KIND || !kind.iter().all(u8::is_ascii_alphabetic) {
        return b"?".to_vec();
    }
    statement(kind, &mut tokens)
}

/// The label of a statement of `kind` (a keyword) whose remaining tokens are `tokens`.
fn statement(kind: &[u8], tokens: &mut Tokens) -> Vec<u8> {
    let kind = kind.to_ascii_uppercase();
    let found = match &kind[..] {
        b"SELECT" => from_clause(tokens, 0),
        b"INSERT" | b"MERGE" => ended_before(tokens, b"INTO").unwrap_or_else(|| table(tokens)),
        b"DELETE" => ended_before(tokens, b"FROM").unwrap_or_else(|| table(tokens)),
        b"UPDATE" | b"COPY" | b"TRUNCATE" => table(tokens),
        b"WITH" => return main_statement(tokens),
        b"CREATE" | b"DROP" | b"ALTER" => return ddl(kind, tokens),
        _ => Found::Absent,
    };
    let mut label = kind;
    match found {
        Found::Table(table) => {
            label.push(b' ');
            label.extend_from_slice(&table);
        }
        Found::Absent => {}
        Found::Cut => push_cut(&mut label),
    }
    label
}

/// The statement after the CTEs of a WITH, labelled as itself (`SELECT orders`). The
/// CTEs' bodies sit inside parentheses; the main statement's keyword is the first one
/// outside them.
fn main_statement(tokens: &mut Tokens) -> Vec<u8> {
    let mut depth = 0usize;
    loop {
        match tokens.next() {
            Some(Token::Open) => depth += 1,
            Some(Token::Close) => depth = depth.saturating_sub(1),
            Some(Token::Word(word)) if depth == 0 && is_one_of(word, MAIN_KINDS) => return statement(word, tokens),
            Some(Token::End) | None => {
                let mut label = b"WITH".to_vec();
                if tokens.cut() {
                    push_cut(&mut label);
                }
                return label;
            }
            Some(_) => {}
        }
    }
}

/// `CREATE TABLE`, `DROP INDEX`, `ALTER MATERIALIZED VIEW`: the object's kind, not its
/// name; just the statement's kind when the object's is no keyword known here.
fn ddl(mut label: Vec<u8>, tokens: &mut Tokens) -> Vec<u8> {
    let mut second = false;
    while let Some(Token::Word(word)) = tokens.next() {
        if !second && is_one_of(word, DDL_MODIFIERS) {
            continue;
        }
        if !is_one_of(word, if second { SECOND_WORDS } else { OBJECTS }) {
            return label;
        }
        label.push(b' ');
        label.extend_from_slice(&word.to_ascii_uppercase());
        if second || !is_one_of(word, TWO_WORD_OBJECTS) {
            return label;
        }
        second = true;
    }
    if tokens.cut() {
        push_cut(&mut label);
    }
    label
}

/// ` …`: what the label wanted lies beyond the captured bytes.
fn push_cut(label: &mut Vec<u8>) {
    label.push(b' ');
    label.extend_from_slice(CUT.encode_utf8(&mut [0; 4]).as_bytes());
}

/// The table after the first FROM at `depth` (nested parentheses passed over: a FROM in
/// `EXTRACT(YEAR FROM ts)` or in a subquery of the select list is not the statement's).
fn from_clause(tokens: &mut Tokens, depth: usize) -> Found {
    let mut level = depth;
    loop {
        match tokens.next() {
            Some(Token::Open) => level += 1,
            Some(Token::Close) if level == depth => return Found::Absent,
            Some(Token::Close) => level -= 1,
            Some(Token::Word(word)) if level == depth && word.eq_ignore_ascii_case(b"FROM") => {
                return table_or_subquery(tokens, depth);
            }
            Some(Token::End) => return Found::Absent,
            None => return end(tokens),
            Some(_) => {}
        }
    }
}

/// What follows FROM: a table, or a subquery whose own FROM names the table.
fn table_or_subquery(tokens: &mut Tokens, depth: usize) -> Found {
    loop {
        match tokens.next() {
            Some(Token::Word(word)) if is_one_of(word, "ONLY LATERAL") => {}
            Some(Token::Open) => return from_clause(tokens, depth + 1),
            Some(token) => return qualified_name(token, tokens),
            None => return end(tokens),
        }
    }
}

/// Passes the words up to `keyword` (INSERT's INTO, DELETE's FROM): None once past it,
/// or what to label when the statement ends before it.
fn ended_before(tokens: &mut Tokens, keyword: &[u8]) -> Option<Found> {
    loop {
        match tokens.next() {
            Some(Token::Word(word)) if word.eq_ignore_ascii_case(keyword) => return None,
            Some(Token::Word(_)) => {}
            Some(_) => return Some(Found::Absent),
            None => return Some(end(tokens)),
        }
    }
}

/// The next name, passing ONLY and TABLE (`UPDATE ONLY t`, `TRUNCATE TABLE t`).
fn table(tokens: &mut Tokens) -> Found {
    loop {
        match tokens.next() {
            Some(Token::Word(word)) if is_one_of(word, "ONLY TABLE") => {}
            Some(token) => return qualified_name(token, tokens),
            None => return end(tokens),
        }
    }
}

/// `name`, `schema.name` or `db.schema.name` starting with `first`; unquoted parts folded
/// to lowercase as PostgreSQL does, quoted ones kept as written (without their quotes).
fn qualified_name(first: Token, tokens: &mut Tokens) -> Found {
    let mut name = Vec::new();
    let mut part = first;
    for i in 0..3 {
        match part {
            Token::Word(word) => name.extend(word.iter().map(u8::to_ascii_lowercase)),
            Token::Quoted(text) => name.extend_from_slice(&text),
            _ => return Found::Absent,
        }
        // A name followed by anything (a space too) is whole.
        match tokens.peek() {
            Some(Token::Dot) if i < 2 => {
                tokens.next();
                name.push(b'.');
            }
            _ => return Found::Table(name),
        }
        match tokens.next() {
            Some(next) => part = next,
            None => return end(tokens),
        }
    }
    Found::Table(name)
}

/// What the end of the tokens means: the text was cut, or the statement had none.
fn end(tokens: &Tokens) -> Found {
    if tokens.cut() {
        Found::Cut
    } else {
        Found::Absent
    }
}

/// The tokens of a statement. At the end of a cut text the last token is dropped (it may
/// be partial), and `cut()` says the end came from the cut.
struct Tokens<'a> {
    sql: &'a [u8],
    pos: usize,
    complete: bool,
}

impl<'a> Tokens<'a> {
    /// Whether the tokens ended because the text was cut.
    fn cut(&self) -> bool {
        !self.complete && self.pos >= self.sql.len()
    }

    fn peek(&mut self) -> Option<Token<'a>> {
        let pos = self.pos;
        let token = self.next();
        if token.is_some() {
            self.pos = pos;
        }
        token
    }

    fn next(&mut self) -> Option<Token<'a>> {
        self.skip_blanks();
        let token = self.token();
        // A word or a number running into the end of a cut text may be partial; a literal
        // the text ends inside has no end at all.
        let partial = matches!(token, Some(Token::Word(_) | Token::Other)) && self.cut();
        if token.is_none() || partial {
            self.pos = self.sql.len();
            return None;
        }
        token
    }

    fn token(&mut self) -> Option<Token<'a>> {
        let start = self.pos;
        let (&first, rest) = self.sql.get(start..)?.split_first()?;
        let token = match first {
            b'(' => self.single(Token::Open),
            b')' => self.single(Token::Close),
            b'.' if !rest.first().is_some_and(u8::is_ascii_digit) => self.single(Token::Dot),
            b';' => self.single(Token::End),
            b'"' => Token::Quoted(self.quoted()?),
            b'\'' => self.string(false)?,
            b'e' | b'E' if rest.first() == Some(&b'\'') => {
                self.pos += 1;
                self.string(true)?
            }
            b'$' if rest.first().is_some_and(|&b| !b.is_ascii_digit()) => self.dollar_quoted()?,
            b if is_word_start(b) => {
                self.pos = self.run_end(start, is_word_byte);
                Token::Word(&self.sql[start..self.pos])
            }
            b if b.is_ascii_digit() || b == b'.' || b == b'$' => {
                self.pos = self.run_end(start, |b| b.is_ascii_alphanumeric() || b == b'.' || b == b'$' || b == b'_');
                Token::Other
            }
            _ => self.single(Token::Other),
        };
        Some(token)
    }

    fn single(&mut self, token: Token<'a>) -> Token<'a> {
        self.pos += 1;
        token
    }

    /// Where the run of bytes from `start` that pass `pred` ends.
    fn run_end(&self, start: usize, pred: fn(u8) -> bool) -> usize {
        self.sql[start..].iter().position(|&b| !pred(b)).map_or(self.sql.len(), |n| start + n)
    }

    /// Whitespace and comments: `-- to the end of the line`, `/* nested /* too */ */`.
    fn skip_blanks(&mut self) {
        loop {
            let rest = &self.sql[self.pos.min(self.sql.len())..];
            if rest.first().is_some_and(u8::is_ascii_whitespace) {
                self.pos += 1;
            } else if rest.starts_with(b"--") {
                self.pos = rest.iter().position(|&b| b == b'\n').map_or(self.sql.len(), |n| self.pos + n + 1);
            } else if rest.starts_with(b"/*") {
                self.pos = self.block_comment_end();
            } else {
                return;
            }
        }
    }

    /// The end of the block comment at `pos`, nesting included.
    fn block_comment_end(&self) -> usize {
        let mut depth = 0usize;
        let mut i = self.pos;
        while i + 1 < self.sql.len() {
            match &self.sql[i..i + 2] {
                b"/*" => {
                    depth += 1;
                    i += 2;
                }
                b"*/" => {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        return i;
                    }
                }
                _ => i += 1,
            }
        }
        self.sql.len()
    }

    /// A `"quoted identifier"` at `pos` (`""` is a quote inside it); None when the text
    /// ends inside it.
    fn quoted(&mut self) -> Option<Vec<u8>> {
        let mut text = Vec::new();
        let mut i = self.pos + 1;
        loop {
            match (self.sql.get(i)?, self.sql.get(i + 1)) {
                (b'"', Some(b'"')) => {
                    text.push(b'"');
                    i += 2;
                }
                (b'"', _) => {
                    self.pos = i + 1;
                    return Some(text);
                }
                (&b, _) => {
                    text.push(b);
                    i += 1;
                }
            }
        }
    }

    /// A string literal at `pos` (`''` is a quote inside it; with `backslash`, as in
    /// `E'...'`, `\'` is too).
    fn string(&mut self, backslash: bool) -> Option<Token<'a>> {
        let mut i = self.pos + 1;
        loop {
            match (self.sql.get(i)?, self.sql.get(i + 1)) {
                (b'\\', _) if backslash => i += 2,
                (b'\'', Some(b'\'')) => i += 2,
                (b'\'', _) => {
                    self.pos = i + 1;
                    return Some(Token::Other);
                }
                _ => i += 1,
            }
        }
    }

    /// A `$tag$ ... $tag$` literal at `pos` (the tag may be empty).
    fn dollar_quoted(&mut self) -> Option<Token<'a>> {
        let tag_len = self.sql[self.pos + 1..].iter().position(|&b| b == b'$')? + 2;
        let tag = &self.sql[self.pos..self.pos + tag_len];
        if !tag[1..tag_len - 1].iter().all(|&b| is_word_byte(b) && b != b'$') {
            self.pos += 1;
            return Some(Token::Other);
        }
        let body = self.pos + tag_len;
        let close = self.sql[body..].windows(tag_len).position(|w| w == tag)?;
        self.pos = body + close + tag_len;
        Some(Token::Other)
    }
}

fn is_word_start(b: u8) -> bool {
    b.is_ascii_alphabetic() || b == b'_' || b >= 0x80
}

fn is_word_byte(b: u8) -> bool {
    is_word_start(b) || b.is_ascii_digit() || b == b'$'
}

#[cfg(test)]
mod tests {
    use super::*;

    fn of(sql: &str) -> String {
        String::from_utf8(label(sql.as_bytes(), true)).unwrap()
    }

    fn of_cut(sql: &str) -> String {
        String::from_utf8(label(sql.as_bytes(), false)).unwrap()
    }

    #[test]
    fn kind_and_main_table() {
        assert_eq!(of("SELECT abalance FROM pgbench_accounts WHERE aid = 123;"), "SELECT pgbench_accounts");
        assert_eq!(of("insert into orders (id, total) values ($1, $2)"), "INSERT orders");
        assert_eq!(of("UPDATE accounts SET balance = balance - 10 WHERE id = 7"), "UPDATE accounts");
        assert_eq!(of("DELETE FROM sessions WHERE expires < now()"), "DELETE sessions");
    }

    #[test]
    fn select_without_from_is_its_kind() {
        assert_eq!(of("SELECT 1"), "SELECT");
        assert_eq!(of("select now();"), "SELECT");
        assert_eq!(of("SELECT 1; SELECT * FROM t"), "SELECT");
    }

    #[test]
    fn comments_whitespace_and_parentheses_before_the_kind_are_passed() {
        assert_eq!(of("  -- fetch\n /* a /* nested */ comment */\n\tselect * from t"), "SELECT t");
        assert_eq!(of("(SELECT a FROM t1) UNION (SELECT a FROM t2)"), "SELECT t1");
    }

    #[test]
    fn a_from_inside_parentheses_is_not_the_statement_s() {
        assert_eq!(of("SELECT extract(year FROM ts), (SELECT max(x) FROM b) FROM orders o"), "SELECT orders");
    }

    #[test]
    fn a_subquery_after_from_gives_its_own_table() {
        assert_eq!(of("SELECT count(*) FROM (SELECT id FROM events WHERE x) e"), "SELECT events");
        assert_eq!(of("SELECT * FROM ONLY parent"), "SELECT parent");
        assert_eq!(of("SELECT * FROM (VALUES (1)) v"), "SELECT");
    }

    #[test]
    fn literals_never_reach_the_label() {
        assert_eq!(of("SELECT 'x FROM secret' FROM t"), "SELECT t");
        assert_eq!(of("SELECT E'it\\'s FROM secret' FROM t"), "SELECT t");
        assert_eq!(of("SELECT 'it''s' , $$ FROM secret $$, $q$ FROM x $q$ FROM t"), "SELECT t");
        assert_eq!(of("SELECT $1::int FROM t"), "SELECT t");
        assert_eq!(of("SELECT 1.5e3, .5 FROM t"), "SELECT t");
    }

    #[test]
    fn identifiers_fold_unless_quoted() {
        assert_eq!(of("SELECT * FROM Products"), "SELECT products");
        assert_eq!(of("SELECT * FROM \"Products\""), "SELECT Products");
        assert_eq!(of("SELECT * FROM \"odd\"\"name\""), "SELECT odd\"name");
        assert_eq!(of("SELECT * FROM Shop.Products p"), "SELECT shop.products");
        assert_eq!(of("SELECT * FROM \"Shop\" . items"), "SELECT Shop.items");
        assert_eq!(of("SELECT * FROM db.s.t.u"), "SELECT db.s.t");
    }

    #[test]
    fn insert_update_delete_details() {
        assert_eq!(of("INSERT INTO public.orders VALUES (1)"), "INSERT public.orders");
        assert_eq!(of("UPDATE ONLY accounts SET x = 1"), "UPDATE accounts");
        assert_eq!(of("DELETE FROM ONLY sessions"), "DELETE sessions");
        assert_eq!(of("MERGE INTO stock s USING x ON true"), "MERGE stock");
        assert_eq!(of("INSERT"), "INSERT");
    }

    #[test]
    fn with_is_labelled_by_its_main_statement() {
        let sql = "WITH recent AS (SELECT * FROM events WHERE ts > now()), x(a) AS MATERIALIZED (SELECT 1) \
                   SELECT * FROM recent JOIN users USING (id)";
        assert_eq!(of(sql), "SELECT recent");
        assert_eq!(of("WITH moved AS (DELETE FROM a RETURNING *) INSERT INTO b SELECT * FROM moved"), "INSERT b");
        assert_eq!(of("WITH RECURSIVE t(n) AS (VALUES (1) UNION ALL SELECT n+1 FROM t) SELECT n FROM t"), "SELECT t");
        assert_eq!(of("WITH"), "WITH");
    }

    #[test]
    fn other_statements_are_their_kind() {
        for (sql, expected) in [
            ("BEGIN", "BEGIN"),
            ("commit;", "COMMIT"),
            ("SET search_path TO app", "SET"),
            ("SHOW server_version", "SHOW"),
            ("EXPLAIN ANALYZE SELECT * FROM t", "EXPLAIN"),
            ("COPY products FROM STDIN", "COPY products"),
            ("TRUNCATE TABLE pgbench_history", "TRUNCATE pgbench_history"),
        ] {
            assert_eq!(of(sql), expected, "{sql}");
        }
    }

    #[test]
    fn ddl_is_kind_and_object_kind() {
        assert_eq!(of("CREATE TABLE t (id int)"), "CREATE TABLE");
        assert_eq!(of("create or replace function f() returns int"), "CREATE FUNCTION");
        assert_eq!(of("CREATE UNIQUE INDEX i ON t (a)"), "CREATE INDEX");
        assert_eq!(of("DROP MATERIALIZED VIEW mv"), "DROP MATERIALIZED VIEW");
        assert_eq!(of("ALTER TABLE t ADD COLUMN c int"), "ALTER TABLE");
        assert_eq!(of("CREATE TEMP TABLE t (a int)"), "CREATE TABLE");
        assert_eq!(of("ALTER DEFAULT PRIVILEGES GRANT"), "ALTER DEFAULT PRIVILEGES");
        // Never a name: CREATE USER alice is CREATE USER.
        assert_eq!(of("CREATE USER alice"), "CREATE USER");
        assert_eq!(of("DROP SOMETHING odd"), "DROP");
        assert_eq!(of("DROP MATERIALIZED odd"), "DROP MATERIALIZED");
        assert_eq!(of_cut("DROP TAB"), "DROP …");
    }

    #[test]
    fn what_is_no_statement_is_unknown() {
        assert_eq!(of(""), "?");
        assert_eq!(of("   "), "?");
        assert_eq!(of("42"), "?");
        assert_eq!(of("'SELECT'"), "?");
        assert_eq!(of("SELECTINGVERYLONGKEYWORDS x"), "?");
        assert_eq!(of("sélect * from t"), "?");
    }

    #[test]
    fn a_cut_statement_keeps_what_was_whole() {
        assert_eq!(of_cut("SELECT abalance FROM pgbench_accounts WHERE a"), "SELECT pgbench_accounts");
        assert_eq!(of_cut("SELECT abalance FROM pgbench_acc"), "SELECT …");
        assert_eq!(of_cut("SELECT abalance FROM pgbench_accounts"), "SELECT …");
        assert_eq!(of_cut("SELECT abalance FROM pgbench_accounts "), "SELECT pgbench_accounts");
        assert_eq!(of_cut("SELECT abalance FROM public."), "SELECT …");
        assert_eq!(of_cut("SELECT a, b, c, d"), "SELECT …");
        assert_eq!(of_cut("SELECT a FROM t WHERE x = 'unterminat"), "SELECT t");
        assert_eq!(of_cut("SEL"), "…");
        assert_eq!(of_cut(""), "…");
        assert_eq!(of_cut("  /* comment"), "…");
        assert_eq!(of_cut("WITH a AS (SELECT 1) SEL"), "WITH …");
        assert_eq!(of_cut("BEGIN"), "…");
        assert_eq!(of_cut("BEGIN "), "BEGIN");
    }

    #[test]
    fn garbage_never_panics() {
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        let alphabet = b"SELECT FROM from ( ) . ; \" ' $ $$ $a$ -- /* */ E' \\ 1 a _ \n \xff";
        for round in 0..3000 {
            let len = round % 64;
            let sql = crate::labels::garbage(&mut state, alphabet, len);
            label(&sql, round % 2 == 0);
        }
    }
}
