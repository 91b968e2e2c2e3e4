//! [`TenantPool`]: tenant isolation enforced by PostgreSQL row-level security, driven by the
//! tenant in the context; [`AdminPool`]: the explicit, separate type for cross-tenant work.
//!
//! A `TenantPool` is a [`TxPool`] that runs `SELECT set_config('app.tenant_id', ..., true)` right
//! after every `BEGIN` (in the same message, the tenant as an escaped string literal), with the
//! tenant read from a context variable the application binds in authenticated code, and runs
//! every statement outside a transaction in a transaction of its own, so that each one has the setting. The setting is transaction-local (`true`): `COMMIT`
//! and `ROLLBACK` end it, so it never survives into the next use of a pooled connection. The
//! database's policies (`USING (tenant_id = NULLIF(current_setting('app.tenant_id', true),
//! '')::text)`) then filter every query, including one that forgets its `WHERE`.

use std::{fmt, ops::Deref, panic::Location};

use contextflow::AsyncLocal;
use futures_util::future::BoxFuture;
use sqlx::{Database, Describe, Either, Execute, Executor, Pool};

use crate::{
    dialect::Dialect,
    error::{Refusal, SetupError, TenantError, TenantErrorKind},
    pool::TxPool,
    tracked::Tracked,
};

/// The setting a [`TenantPool`] sets by default: `app.tenant_id`.
pub const DEFAULT_SETTING: &str = "app.tenant_id";

/// The tenant column a [`TenantPool`]'s start-up check looks for by default: `tenant_id`.
pub const DEFAULT_COLUMN: &str = "tenant_id";

/// The longest tenant accepted, in bytes.
const MAX_TENANT_LEN: usize = 256;

/// The name of the policy [`AdminPool::enable_row_level_security`] creates.
const POLICY: &str = "contextflow_tenant_isolation";

/// A [`TxPool`] whose every statement runs with the context's tenant set for PostgreSQL's
/// row-level security, so the database itself keeps tenants apart.
///
/// It dereferences to [`TxPool`]: `transaction`, `transaction_with`, `execute`, the `fetch_*`
/// methods, `after_commit` and sqlx's query API through `&TenantPool` work as there, plus:
///
/// - **Fail closed.** No statement runs without a tenant in the context: it fails with a
///   [`TenantError`] that names the caller's location. A tenant that is empty, longer than
///   256 bytes or contains a NUL byte is refused the same way.
/// - **One tenant per transaction.** The tenant is read when the transaction begins; a
///   statement (or nested block) inside it whose context has another tenant fails with a
///   [`TenantError`] of kind [`Changed`](TenantErrorKind::Changed).
/// - **Statements outside a transaction** each run in a transaction of their own (`BEGIN`,
///   `set_config`, the statement, `COMMIT`: two more round trips, as `BEGIN` and
///   `set_config` travel in one message); group them in a
///   `transaction` block. [`acquire`](TxPool::acquire) needs a transaction. Such a
///   statement's transaction commits before its rows are handed out: a row stream
///   ([`fetch`](sqlx::Executor::fetch)) yields them from memory once the statement has
///   committed, so a caller that stops after the first row of an `INSERT ... RETURNING` holds
///   the id of a row that exists (and a stream dropped before its first row leaves nothing
///   committed). A read too large to hold in memory streams inside a `transaction` block,
///   where the block decides.
/// - **Start-up check.** [`TenantPool::new`] refuses (with every problem found) a pool whose
///   role is a superuser or has `BYPASSRLS` (also a superuser session that switched role),
///   can become such a role (`SET ROLE`, as a member of it, or `RESET ROLE`), has
///   `CREATEROLE` (it could grant itself one), owns a table with a tenant
///   column, or can reach (a column grant is enough) such a table that lacks `ENABLE` and
///   `FORCE ROW LEVEL SECURITY` and a policy, that has a permissive policy for the role that
///   reads neither the setting nor a function of the database's own (`USING (true)`:
///   permissive policies are combined with `OR`) unless a restrictive policy for the same
///   command does (restrictive policies are combined with `AND`; "reads the setting" is a
///   look at the policy's text, not a proof), or that the role may `TRUNCATE` (row-level
///   security does not apply to it); a view over one (through any number of views, whatever
///   columns the view keeps) without `security_invoker`, or a materialized view over one.
///
/// The tenant comes from a context variable of the application's, bound by authenticated code
/// only (never from a header or a message: see the crate docs). Its [`Display`](fmt::Display)
/// output is the tenant sent to the database.
///
/// ```no_run
/// # #[cfg(feature = "postgres")]
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use contextflow::AsyncLocal;
/// use contextflow_sqlx::TenantPool;
///
/// /// Bound by the authentication middleware only.
/// static TENANT: AsyncLocal<String> = AsyncLocal::named("tenant");
///
/// let pool = sqlx::PgPool::connect("postgres://app_user@127.0.0.1:5432/app").await?;
/// let db = TenantPool::new(pool, &TENANT).await?; // refuses an unsafe set-up
///
/// let orders: Vec<(i64,)> = TENANT
///     .scope("acme".to_string(), async {
///         // No `WHERE tenant_id = ..`: the policy filters.
///         sqlx::query_as("SELECT id FROM orders").fetch_all(&*db).await
///     })
///     .await?;
/// # let _ = orders;
/// # Ok(()) }
/// # #[cfg(not(feature = "postgres"))] fn main() {}
/// ```
pub struct TenantPool<DB: Database> {
    db: TxPool<DB>,
}

/// Builds a [`TenantPool`]; from [`TenantPool::builder`].
///
/// ```no_run
/// # #[cfg(feature = "postgres")]
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # static TENANT: contextflow::AsyncLocal<String> = contextflow::AsyncLocal::new();
/// # let pool = sqlx::PgPool::connect("postgres://app_user@127.0.0.1:5432/app").await?;
/// let db = contextflow_sqlx::TenantPool::builder(pool, &TENANT)
///     .setting("app.tenant_id")
///     .column("tenant_id")
///     .build()
///     .await?;
/// # let _ = db;
/// # Ok(()) }
/// # #[cfg(not(feature = "postgres"))] fn main() {}
/// ```
pub struct TenantPoolBuilder<DB: Database> {
    pool: Pool<DB>,
    var: Box<dyn TenantVar>,
    setting: String,
    column: String,
    check_on_acquire: bool,
}

/// A [`TxPool`] for cross-tenant work, kept apart from [`TenantPool`] by its type: migrations
/// (connected as the tables' owner) and reports over all tenants (connected as a role with
/// `BYPASSRLS`). It sets no tenant and checks nothing about its role.
///
/// It dereferences to [`TxPool`], and `&AdminPool` is an sqlx [`Executor`].
///
/// ```no_run
/// # #[cfg(feature = "postgres")]
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), sqlx::Error> {
/// use contextflow_sqlx::{AdminPool, DEFAULT_COLUMN, DEFAULT_SETTING};
///
/// let owner = AdminPool::new(sqlx::PgPool::connect("postgres://app_owner@127.0.0.1/app").await?);
/// owner
///     .execute(sqlx::query("CREATE TABLE IF NOT EXISTS orders (id BIGSERIAL, tenant_id TEXT NOT NULL)"))
///     .await?;
/// owner.enable_row_level_security("orders", DEFAULT_COLUMN, DEFAULT_SETTING).await?;
/// let total: i64 = sqlx::query_scalar("SELECT count(*) FROM orders").fetch_one(&*owner).await?;
/// # let _ = total;
/// # Ok(()) }
/// # #[cfg(not(feature = "postgres"))] fn main() {}
/// ```
pub struct AdminPool<DB: Database> {
    db: TxPool<DB>,
}

/// A database that can enforce tenants with row-level security: PostgreSQL, directly (feature
/// `postgres`) or through sqlx's `Any` driver (checked when the pool is built). Sealed.
///
/// ```
/// fn needs_rls<DB: contextflow_sqlx::RlsDatabase>() {}
/// needs_rls::<sqlx::Any>();
/// ```
pub trait RlsDatabase: Database + sealed::Sealed {}

pub(crate) mod sealed {
    use futures_util::future::BoxFuture;
    use sqlx::Database;

    use crate::error::Refusal;

    /// What a [`TenantPool`](crate::TenantPool) needs to run on a database.
    pub trait Sealed: Database {
        /// `SELECT set_config($1, $2, true)`.
        fn set_config<'c>(
            conn: &'c mut Self::Connection,
            setting: &'c str,
            value: &'c str,
        ) -> BoxFuture<'c, Result<(), sqlx::Error>>;

        /// The start-up check's findings.
        fn check<'c>(
            conn: &'c mut Self::Connection,
            column: &'c str,
            setting: &'c str,
        ) -> BoxFuture<'c, Result<Vec<Refusal>, sqlx::Error>>;

        /// The SQL type of `table.column`, as `format_type` writes it.
        fn column_type<'c>(
            conn: &'c mut Self::Connection,
            table: &'c str,
            column: &'c str,
        ) -> BoxFuture<'c, Result<String, sqlx::Error>>;
    }
}

/// The application's tenant variable, type-erased.
trait TenantVar: Send + Sync + 'static {
    fn read(&self, f: &mut dyn FnMut(Option<&dyn fmt::Display>));
}

/// What a [`TxPool`] in tenant mode needs.
pub(crate) struct TenantMode<DB: Database> {
    var: Box<dyn TenantVar>,
    setting: Box<str>,
    set_config: SetConfig<DB>,
}

type SetConfig<DB> = for<'c> fn(
    &'c mut <DB as Database>::Connection,
    &'c str,
    &'c str,
) -> BoxFuture<'c, Result<(), sqlx::Error>>;

// ===== impl TenantPool =====

impl<DB: RlsDatabase> TenantPool<DB>
where
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
{
    /// Checks that `pool` is set up for row-level security (see the type's docs) and builds a
    /// tenant pool over it that reads the tenant from `tenant`, with the defaults:
    /// [`DEFAULT_SETTING`], [`DEFAULT_COLUMN`], connections checked on acquire.
    ///
    /// # Errors
    /// [`SetupError::Refused`] with every problem found; [`SetupError::Database`] when the
    /// check could not run.
    ///
    /// ```no_run
    /// # #[cfg(feature = "postgres")]
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # static TENANT: contextflow::AsyncLocal<String> = contextflow::AsyncLocal::new();
    /// let pool = sqlx::PgPool::connect("postgres://app_user@127.0.0.1:5432/app").await?;
    /// let db = contextflow_sqlx::TenantPool::new(pool, &TENANT).await?;
    /// # let _ = db;
    /// # Ok(()) }
    /// # #[cfg(not(feature = "postgres"))] fn main() {}
    /// ```
    pub async fn new<T>(pool: Pool<DB>, tenant: &'static AsyncLocal<T>) -> Result<Self, SetupError>
    where
        T: fmt::Display + Send + Sync + 'static,
    {
        Self::builder(pool, tenant).build().await
    }

    /// A builder, to set options before the check.
    ///
    /// ```no_run
    /// # #[cfg(feature = "postgres")]
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # static TENANT: contextflow::AsyncLocal<String> = contextflow::AsyncLocal::new();
    /// # let pool = sqlx::PgPool::connect("postgres://app_user@127.0.0.1:5432/app").await?;
    /// let db = contextflow_sqlx::TenantPool::builder(pool, &TENANT).column("org_id").build().await?;
    /// # let _ = db;
    /// # Ok(()) }
    /// # #[cfg(not(feature = "postgres"))] fn main() {}
    /// ```
    pub fn builder<T>(pool: Pool<DB>, tenant: &'static AsyncLocal<T>) -> TenantPoolBuilder<DB>
    where
        T: fmt::Display + Send + Sync + 'static,
    {
        TenantPoolBuilder {
            pool,
            var: Box::new(tenant),
            setting: DEFAULT_SETTING.to_owned(),
            column: DEFAULT_COLUMN.to_owned(),
            check_on_acquire: true,
        }
    }
}

impl<DB: Database> TenantPool<DB> {
    /// The underlying [`TxPool`] (also reachable through `Deref`).
    ///
    /// ```
    /// fn repository_pool<DB: sqlx::Database>(
    ///     db: &contextflow_sqlx::TenantPool<DB>,
    /// ) -> &contextflow_sqlx::TxPool<DB> {
    ///     db.as_tx_pool()
    /// }
    /// # let _ = repository_pool::<sqlx::Any>;
    /// ```
    pub fn as_tx_pool(&self) -> &TxPool<DB> {
        &self.db
    }
}

impl<DB: Database> Deref for TenantPool<DB> {
    type Target = TxPool<DB>;

    fn deref(&self) -> &TxPool<DB> {
        &self.db
    }
}

impl<DB: Database> Clone for TenantPool<DB> {
    fn clone(&self) -> Self {
        TenantPool {
            db: self.db.clone(),
        }
    }
}

impl<DB: Database> fmt::Debug for TenantPool<DB> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("TenantPool").field(&self.db).finish()
    }
}

// ===== impl TenantPoolBuilder =====

impl<DB: RlsDatabase> TenantPoolBuilder<DB>
where
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
{
    /// The PostgreSQL setting that carries the tenant (default [`DEFAULT_SETTING`]): a custom
    /// setting has a dot in its name; letters, digits, `_` and `.` only.
    ///
    /// ```no_run
    /// # #[cfg(feature = "postgres")]
    /// # async fn f(pool: sqlx::PgPool) -> Result<(), contextflow_sqlx::SetupError> {
    /// # static TENANT: contextflow::AsyncLocal<String> = contextflow::AsyncLocal::new();
    /// let db = contextflow_sqlx::TenantPool::builder(pool, &TENANT).setting("myapp.org").build().await?;
    /// # let _ = db; Ok(()) }
    /// # #[cfg(feature = "postgres")] let _ = f;
    /// ```
    pub fn setting(mut self, setting: &str) -> Self {
        self.setting = setting.to_owned();
        self
    }

    /// The column that marks a table as holding tenant data, for the start-up check (default
    /// [`DEFAULT_COLUMN`]).
    ///
    /// ```no_run
    /// # #[cfg(feature = "postgres")]
    /// # async fn f(pool: sqlx::PgPool) -> Result<(), contextflow_sqlx::SetupError> {
    /// # static TENANT: contextflow::AsyncLocal<String> = contextflow::AsyncLocal::new();
    /// let db = contextflow_sqlx::TenantPool::builder(pool, &TENANT).column("org_id").build().await?;
    /// # let _ = db; Ok(()) }
    /// # #[cfg(feature = "postgres")] let _ = f;
    /// ```
    pub fn column(mut self, column: &str) -> Self {
        self.column = column.to_owned();
        self
    }

    /// Whether to check each connection taken from the pool (see
    /// [`TxPoolBuilder::check_on_acquire`](crate::TxPoolBuilder::check_on_acquire)); default on.
    ///
    /// ```no_run
    /// # #[cfg(feature = "postgres")]
    /// # async fn f(pool: sqlx::PgPool) -> Result<(), contextflow_sqlx::SetupError> {
    /// # static TENANT: contextflow::AsyncLocal<String> = contextflow::AsyncLocal::new();
    /// let db = contextflow_sqlx::TenantPool::builder(pool, &TENANT).check_on_acquire(false).build().await?;
    /// # let _ = db; Ok(()) }
    /// # #[cfg(feature = "postgres")] let _ = f;
    /// ```
    pub fn check_on_acquire(mut self, check: bool) -> Self {
        self.check_on_acquire = check;
        self
    }

    /// Runs the start-up check and builds the pool.
    ///
    /// # Errors
    /// As [`TenantPool::new`]; also [`SetupError::Database`] (a
    /// [`sqlx::Error::Configuration`]) for a setting or column name that is not one.
    ///
    /// ```no_run
    /// # #[cfg(feature = "postgres")]
    /// # async fn f(pool: sqlx::PgPool) -> Result<(), contextflow_sqlx::SetupError> {
    /// # static TENANT: contextflow::AsyncLocal<String> = contextflow::AsyncLocal::new();
    /// match contextflow_sqlx::TenantPool::builder(pool, &TENANT).build().await {
    ///     Ok(db) => drop(db),
    ///     Err(refused) => panic!("refusing to serve: {refused}"),
    /// }
    /// # Ok(()) }
    /// # #[cfg(feature = "postgres")] let _ = f;
    /// ```
    pub async fn build(self) -> Result<TenantPool<DB>, SetupError> {
        if !is_setting_name(&self.setting) {
            return Err(configuration(format!(
                "not a custom setting name: {:?} (letters, digits, `_`, with a `.`)",
                self.setting
            )));
        }
        if !is_identifier(&self.column) {
            return Err(configuration(format!(
                "not a column name: {:?}",
                self.column
            )));
        }
        let mut conn = self.pool.acquire().await?;
        let dialect = Dialect::of::<DB>(&mut conn);
        if dialect != Dialect::Postgres {
            return Err(SetupError::Refused(vec![Refusal::NotPostgres {
                database: dialect.name().to_owned(),
            }]));
        }
        let mut refusals = DB::check(&mut conn, &self.column, &self.setting).await?;
        if !refusals.is_empty() {
            // The check reads the catalog in its snapshot, but PostgreSQL's privilege
            // functions read the latest committed state: a table whose migration commits
            // while the check runs (created, then secured and granted) can be seen granted
            // but not yet secured. Only what a second check finds again is refused.
            let again = DB::check(&mut conn, &self.column, &self.setting).await?;
            refusals.retain(|refusal| again.contains(refusal));
        }
        drop(conn);
        if !refusals.is_empty() {
            return Err(SetupError::Refused(refusals));
        }
        let mode = TenantMode {
            var: self.var,
            setting: self.setting.into_boxed_str(),
            set_config: DB::set_config,
        };
        Ok(TenantPool {
            db: TxPool::with_tenant(self.pool, self.check_on_acquire, mode),
        })
    }
}

impl<DB: Database> fmt::Debug for TenantPoolBuilder<DB> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TenantPoolBuilder")
            .field("pool", &self.pool)
            .field("setting", &self.setting)
            .field("column", &self.column)
            .field("check_on_acquire", &self.check_on_acquire)
            .finish_non_exhaustive()
    }
}

// ===== impl AdminPool =====

impl<DB: Database> AdminPool<DB>
where
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
{
    /// Wraps `pool`, connected as a role that may cross tenants (the tables' owner for
    /// migrations, a `BYPASSRLS` role for reports).
    ///
    /// ```no_run
    /// # #[cfg(feature = "postgres")]
    /// # async fn f() -> Result<(), sqlx::Error> {
    /// let owner = contextflow_sqlx::AdminPool::new(sqlx::PgPool::connect("postgres://app_owner@/app").await?);
    /// # let _ = owner; Ok(()) }
    /// # #[cfg(feature = "postgres")] let _ = f;
    /// ```
    pub fn new(pool: Pool<DB>) -> Self {
        AdminPool {
            db: TxPool::new(pool),
        }
    }
}

impl<DB: RlsDatabase> AdminPool<DB>
where
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
{
    /// Turns tenant isolation on for `table` (`name` or `schema.name`, as stored in the
    /// catalog): `ENABLE` and `FORCE ROW LEVEL SECURITY`, and a policy that shows and accepts
    /// only rows whose `column` equals the `setting` a [`TenantPool`] sets (cast to the
    /// column's type; an unset or empty setting matches nothing). Idempotent: the policy
    /// (`contextflow_tenant_isolation`) is replaced if it exists. Run it as the table's owner,
    /// in a migration.
    ///
    /// # Errors
    /// A [`sqlx::Error::Configuration`] for a name that is not a plain identifier; the
    /// database's error otherwise (no such table or column, not the owner).
    ///
    /// ```no_run
    /// # #[cfg(feature = "postgres")]
    /// # async fn f(owner: contextflow_sqlx::AdminPool<sqlx::Postgres>) -> Result<(), sqlx::Error> {
    /// owner.enable_row_level_security("public.orders", "tenant_id", "app.tenant_id").await?;
    /// # Ok(()) }
    /// # #[cfg(feature = "postgres")] let _ = f;
    /// ```
    pub async fn enable_row_level_security(
        &self,
        table: &str,
        column: &str,
        setting: &str,
    ) -> Result<(), sqlx::Error> {
        let parts: Vec<&str> = table.split('.').collect();
        if parts.len() > 2 || !parts.iter().all(|part| is_identifier(part)) {
            return Err(sqlx::Error::Configuration(
                format!("not a table name: {table:?}").into(),
            ));
        }
        if !is_identifier(column) || !is_setting_name(setting) {
            return Err(sqlx::Error::Configuration(
                format!("not a column or setting name: {column:?}, {setting:?}").into(),
            ));
        }
        let table = parts
            .iter()
            .map(|part| format!("\"{part}\""))
            .collect::<Vec<_>>()
            .join(".");
        let quoted = format!("\"{column}\"");
        self.db
            .transaction(|| async {
                let mut conn = self.db.acquire().await?;
                let ty = DB::column_type(&mut conn, &table, column).await?;
                let tenant = format!("NULLIF(current_setting('{setting}', true), '')::{ty}");
                for sql in [
                    format!("ALTER TABLE {table} ENABLE ROW LEVEL SECURITY"),
                    format!("ALTER TABLE {table} FORCE ROW LEVEL SECURITY"),
                    format!("DROP POLICY IF EXISTS {POLICY} ON {table}"),
                    format!(
                        "CREATE POLICY {POLICY} ON {table} \
                         USING ({quoted} = {tenant}) WITH CHECK ({quoted} = {tenant})"
                    ),
                ] {
                    (&mut *conn).execute(sql.as_str()).await?;
                }
                Ok::<_, sqlx::Error>(())
            })
            .await
    }
}

impl<DB: Database> AdminPool<DB> {
    /// The underlying [`TxPool`] (also reachable through `Deref`).
    ///
    /// ```
    /// fn admin_tx_pool<DB: sqlx::Database>(
    ///     db: &contextflow_sqlx::AdminPool<DB>,
    /// ) -> &contextflow_sqlx::TxPool<DB> {
    ///     db.as_tx_pool()
    /// }
    /// # let _ = admin_tx_pool::<sqlx::Any>;
    /// ```
    pub fn as_tx_pool(&self) -> &TxPool<DB> {
        &self.db
    }
}

impl<DB: Database> Deref for AdminPool<DB> {
    type Target = TxPool<DB>;

    fn deref(&self) -> &TxPool<DB> {
        &self.db
    }
}

impl<DB: Database> Clone for AdminPool<DB> {
    fn clone(&self) -> Self {
        AdminPool {
            db: self.db.clone(),
        }
    }
}

impl<DB: Database> fmt::Debug for AdminPool<DB> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("AdminPool").field(&self.db).finish()
    }
}

// ===== impl TenantMode =====

impl<DB: Database> TenantMode<DB> {
    /// The tenant in the context, for a new transaction.
    pub(crate) fn require(
        &self,
        called_at: &'static Location<'static>,
    ) -> Result<Box<str>, sqlx::Error> {
        let mut tenant = None;
        self.var
            .read(&mut |value| tenant = value.map(|value| value.to_string()));
        let Some(tenant) = tenant else {
            return Err(TenantError::error(TenantErrorKind::Missing, called_at));
        };
        if tenant.is_empty() || tenant.len() > MAX_TENANT_LEN || tenant.contains('\0') {
            return Err(TenantError::error(TenantErrorKind::Invalid, called_at));
        }
        Ok(tenant.into_boxed_str())
    }

    /// Checks, without allocating, that the context's tenant is still `tenant`.
    pub(crate) fn check_same(
        &self,
        tenant: &str,
        called_at: &'static Location<'static>,
    ) -> Result<(), sqlx::Error> {
        let mut same = None;
        self.var
            .read(&mut |value| same = value.map(|value| displays_as(value, tenant)));
        match same {
            Some(true) => Ok(()),
            Some(false) => Err(TenantError::error(TenantErrorKind::Changed, called_at)),
            None => Err(TenantError::error(TenantErrorKind::Missing, called_at)),
        }
    }

    /// The setting that holds the tenant (`app.tenant_id` by default).
    pub(crate) fn setting(&self) -> &str {
        &self.setting
    }

    /// Sets the tenant for the transaction open on `tracked`.
    pub(crate) async fn set(
        &self,
        tracked: &mut Tracked<DB>,
        tenant: &str,
    ) -> Result<(), sqlx::Error> {
        (self.set_config)(tracked.raw(), &self.setting, tenant).await
    }
}

impl<T: fmt::Display + Send + Sync + 'static> TenantVar for &'static AsyncLocal<T> {
    fn read(&self, f: &mut dyn FnMut(Option<&dyn fmt::Display>)) {
        self.with(|value| f(value.map(|value| value as &dyn fmt::Display)));
    }
}

/// Whether `value` displays exactly as `expected`, without allocating.
fn displays_as(value: &dyn fmt::Display, expected: &str) -> bool {
    struct Compare<'a> {
        rest: &'a str,
        same: bool,
    }
    impl fmt::Write for Compare<'_> {
        fn write_str(&mut self, s: &str) -> fmt::Result {
            match self.rest.strip_prefix(s) {
                Some(rest) if self.same => self.rest = rest,
                _ => self.same = false,
            }
            Ok(())
        }
    }
    let mut compare = Compare {
        rest: expected,
        same: true,
    };
    let _ = fmt::write(&mut compare, format_args!("{value}"));
    compare.same && compare.rest.is_empty()
}

/// A custom PostgreSQL setting name: `prefix.name`, letters, digits and `_`.
fn is_setting_name(name: &str) -> bool {
    name.len() <= 128 && name.contains('.') && name.split('.').all(is_identifier)
}

/// A plain SQL identifier: a letter or `_`, then letters, digits or `_`, at most 63 bytes.
fn is_identifier(name: &str) -> bool {
    let mut bytes = name.bytes();
    name.len() <= 63
        && bytes
            .next()
            .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

fn configuration(message: String) -> SetupError {
    SetupError::Database(sqlx::Error::Configuration(message.into()))
}

// ===== RlsDatabase for PostgreSQL and Any =====

/// The role check: `(role, is superuser, has BYPASSRLS, session user, session user is
/// superuser)`.
const ROLE_SQL: &str = "SELECT current_user::text, r.rolsuper, r.rolbypassrls, \
                        session_user::text, s.rolsuper, r.rolcreaterole OR s.rolcreaterole \
                        FROM pg_roles r, pg_roles s \
                        WHERE r.rolname = current_user AND s.rolname = session_user";

/// The roles that are superusers or have `BYPASSRLS` and that the connection can become:
/// `SET ROLE` to a role the current or the session user is a member of (PostgreSQL checks
/// the session user's memberships), or `RESET ROLE` back to the session user. A superuser
/// session user is reported on its own.
const ESCAPE_ROLES_SQL: &str = "SELECT rolname::text FROM pg_roles \
                                WHERE (rolsuper OR rolbypassrls) AND rolname <> current_user \
                                AND NOT (rolsuper AND rolname = session_user) \
                                AND (pg_has_role(current_user, oid, 'MEMBER') \
                                     OR pg_has_role(session_user, oid, 'MEMBER')) ORDER BY 1";

/// Every relation that the role owns or can read or write (a column grant is enough) and that
/// has a tenant column, or is a view or materialized view over such a relation (through any
/// number of views: a view shows its tables' rows whatever columns it keeps). `pol` is each
/// policy's facts: whether it applies to the pool's role (`PUBLIC` is role 0), whether it
/// calls a function of the database's own, and whether both its expressions name the setting
/// (`$2`, the setting's quoted literal).
const TABLES_SQL: &str = "WITH RECURSIVE tenant_rel(oid) AS ( \
       SELECT a.attrelid FROM pg_attribute a \
       WHERE a.attname = $1 AND a.attnum > 0 AND NOT a.attisdropped \
     UNION \
       SELECT rw.ev_class FROM pg_rewrite rw \
       JOIN pg_depend d ON d.classid = 'pg_rewrite'::regclass AND d.objid = rw.oid \
                       AND d.refclassid = 'pg_class'::regclass \
       JOIN tenant_rel t ON t.oid = d.refobjid \
       WHERE rw.ev_class <> d.refobjid \
     ), \
     pol AS ( \
       SELECT p.polrelid, p.polname, p.polpermissive, p.polcmd, \
         EXISTS (SELECT 1 FROM unnest(p.polroles) AS r(oid) \
                 WHERE CASE WHEN r.oid = 0 THEN true \
                       ELSE pg_has_role(current_user, r.oid, 'USAGE') END) AS applies, \
         EXISTS (SELECT 1 FROM pg_depend d \
                 WHERE d.classid = 'pg_policy'::regclass AND d.objid = p.oid \
                   AND d.refclassid = 'pg_proc'::regclass) AS calls, \
         strpos(COALESCE(pg_get_expr(p.polqual, p.polrelid), $2), $2) > 0 \
           AND strpos(COALESCE(pg_get_expr(p.polwithcheck, p.polrelid), $2), $2) > 0 AS reads \
       FROM pg_policy p WHERE p.polrelid IN (SELECT oid FROM tenant_rel) \
     ) \
     SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname), \
       c.relkind::text, c.relrowsecurity, c.relforcerowsecurity, \
       COALESCE(pg_has_role(current_user, c.relowner, 'MEMBER'), false), \
       EXISTS (SELECT 1 FROM pg_policy p WHERE p.polrelid = c.oid), \
       COALESCE((SELECT bool_or(lower(split_part(o, '=', 2)) IN ('true', 'on', '1', 'yes')) \
                 FROM unnest(c.reloptions) AS o \
                 WHERE split_part(o, '=', 1) = 'security_invoker'), false), \
       COALESCE((SELECT string_agg(quote_ident(p.polname), ', ' ORDER BY p.polname) \
                 FROM pol p \
                 WHERE p.polrelid = c.oid AND p.polpermissive AND p.applies \
                   AND NOT (p.calls OR p.reads) \
                   AND NOT EXISTS (SELECT 1 FROM pol q \
                                   WHERE q.polrelid = c.oid AND NOT q.polpermissive \
                                     AND q.applies AND (q.calls OR q.reads) \
                                     AND (q.polcmd = '*' OR q.polcmd = p.polcmd))), \
                ''), \
       COALESCE(c.relkind IN ('r', 'p') AND has_table_privilege(c.oid, 'TRUNCATE'), false) \
     FROM pg_class c \
     JOIN pg_namespace n ON n.oid = c.relnamespace \
     WHERE c.oid IN (SELECT oid FROM tenant_rel) \
       AND c.relkind IN ('r', 'p', 'v', 'm') \
       AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
       AND n.nspname NOT LIKE 'pg\\_%' \
       AND (pg_has_role(current_user, c.relowner, 'MEMBER') \
            OR has_table_privilege(c.oid, 'SELECT, INSERT, UPDATE, DELETE, TRUNCATE') \
            OR has_any_column_privilege(c.oid, 'SELECT, INSERT, UPDATE')) \
     ORDER BY 1";

const COLUMN_TYPE_SQL: &str = "SELECT format_type(a.atttypid, a.atttypmod) FROM pg_attribute a \
                               WHERE a.attrelid = $1::regclass AND a.attname = $2 \
                               AND a.attnum > 0 AND NOT a.attisdropped";

macro_rules! rls_database {
    ($db:ty) => {
        impl RlsDatabase for $db {}

        impl sealed::Sealed for $db {
            fn set_config<'c>(
                conn: &'c mut Self::Connection,
                setting: &'c str,
                value: &'c str,
            ) -> BoxFuture<'c, Result<(), sqlx::Error>> {
                Box::pin(async move {
                    sqlx::query("SELECT set_config($1, $2, true)")
                        .bind(setting)
                        .bind(value)
                        .execute(&mut *conn)
                        .await
                        .map(drop)
                })
            }

            fn check<'c>(
                conn: &'c mut Self::Connection,
                column: &'c str,
                setting: &'c str,
            ) -> BoxFuture<'c, Result<Vec<Refusal>, sqlx::Error>> {
                Box::pin(async move {
                    use sqlx::Row as _;
                    let mut refusals = Vec::new();
                    let role = sqlx::query(ROLE_SQL).fetch_one(&mut *conn).await?;
                    let name: String = role.try_get(0)?;
                    if role.try_get::<bool, _>(1)? {
                        refusals.push(Refusal::Superuser { role: name.clone() });
                    } else if role.try_get::<bool, _>(4)? {
                        refusals.push(Refusal::SessionSuperuser {
                            role: role.try_get(3)?,
                        });
                    }
                    if role.try_get::<bool, _>(2)? {
                        refusals.push(Refusal::BypassRls { role: name.clone() });
                    }
                    if role.try_get::<bool, _>(5)? {
                        refusals.push(Refusal::CreateRole { role: name.clone() });
                    }
                    for target in sqlx::query_scalar::<_, String>(ESCAPE_ROLES_SQL)
                        .fetch_all(&mut *conn)
                        .await?
                    {
                        refusals.push(Refusal::CanBecome {
                            role: name.clone(),
                            target,
                        });
                    }
                    // How a policy names the setting: a quoted literal (`current_setting(
                    // 'app.tenant_id'::text, true)` as PostgreSQL prints it back). The name
                    // is letters, digits, `_` and `.` only.
                    let literal = format!("'{setting}'");
                    let tables = sqlx::query(TABLES_SQL)
                        .bind(column)
                        .bind(literal)
                        .fetch_all(&mut *conn)
                        .await?;
                    if tables.is_empty() {
                        tracing::warn!(
                            target: "contextflow_sqlx",
                            column,
                            "no table with a tenant column is reachable: nothing to isolate"
                        );
                    }
                    for row in tables {
                        let table: String = row.try_get(0)?;
                        let kind: String = row.try_get(1)?;
                        let enabled: bool = row.try_get(2)?;
                        let forced: bool = row.try_get(3)?;
                        let owned: bool = row.try_get(4)?;
                        let has_policy: bool = row.try_get(5)?;
                        let invoker: bool = row.try_get(6)?;
                        let ignoring: String = row.try_get(7)?;
                        let truncate: bool = row.try_get(8)?;
                        match kind.as_str() {
                            "v" if !invoker => {
                                refusals.push(Refusal::ViewWithoutSecurityInvoker { view: table })
                            }
                            "v" => {}
                            "m" => refusals.push(Refusal::MaterializedView { view: table }),
                            _ => {
                                if owned {
                                    refusals.push(Refusal::OwnsTable { table: table.clone() });
                                }
                                if !enabled {
                                    refusals.push(Refusal::NotEnabled { table: table.clone() });
                                }
                                if !forced {
                                    refusals.push(Refusal::NotForced { table: table.clone() });
                                }
                                if truncate {
                                    refusals.push(Refusal::CanTruncate { table: table.clone() });
                                }
                                if !ignoring.is_empty() {
                                    refusals.push(Refusal::PolicyIgnoresTenant {
                                        table: table.clone(),
                                        policies: ignoring,
                                    });
                                }
                                if !has_policy {
                                    refusals.push(Refusal::NoPolicy { table });
                                }
                            }
                        }
                    }
                    Ok(refusals)
                })
            }

            fn column_type<'c>(
                conn: &'c mut Self::Connection,
                table: &'c str,
                column: &'c str,
            ) -> BoxFuture<'c, Result<String, sqlx::Error>> {
                Box::pin(async move {
                    use sqlx::Row as _;
                    let row = sqlx::query(COLUMN_TYPE_SQL)
                        .bind(table)
                        .bind(column)
                        .fetch_one(&mut *conn)
                        .await?;
                    row.try_get(0)
                })
            }
        }
    };
}

#[cfg(feature = "postgres")]
rls_database!(sqlx::Postgres);
rls_database!(sqlx::Any);

// ===== Executor for the wrappers =====

macro_rules! delegate_executor {
    ($wrapper:ident) => {
        /// Runs queries exactly as `&TxPool` does (see its [`Executor`] implementation).
        impl<'p, DB: Database> Executor<'p> for &'p $wrapper<DB>
        where
            for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
        {
            type Database = DB;

            #[track_caller]
            fn fetch_many<'e, 'q: 'e, E>(
                self,
                query: E,
            ) -> futures_util::stream::BoxStream<
                'e,
                Result<Either<DB::QueryResult, DB::Row>, sqlx::Error>,
            >
            where
                'p: 'e,
                E: 'q + Execute<'q, DB>,
            {
                Executor::fetch_many(&self.db, query)
            }

            // `execute` and `fetch_all` must be `&TxPool`'s own, not sqlx's defaults (which
            // collect a row stream, whose statement counts as answered at its first item):
            // given up on before its result, a statement poisons the transaction it runs in.
            #[track_caller]
            fn execute<'e, 'q: 'e, E>(
                self,
                query: E,
            ) -> BoxFuture<'e, Result<DB::QueryResult, sqlx::Error>>
            where
                'p: 'e,
                E: 'q + Execute<'q, DB>,
            {
                Executor::execute(&self.db, query)
            }

            #[track_caller]
            fn fetch_all<'e, 'q: 'e, E>(
                self,
                query: E,
            ) -> BoxFuture<'e, Result<Vec<DB::Row>, sqlx::Error>>
            where
                'p: 'e,
                E: 'q + Execute<'q, DB>,
            {
                Executor::fetch_all(&self.db, query)
            }

            #[track_caller]
            fn fetch_optional<'e, 'q: 'e, E>(
                self,
                query: E,
            ) -> BoxFuture<'e, Result<Option<DB::Row>, sqlx::Error>>
            where
                'p: 'e,
                E: 'q + Execute<'q, DB>,
            {
                Executor::fetch_optional(&self.db, query)
            }

            #[track_caller]
            fn prepare_with<'e, 'q: 'e>(
                self,
                sql: &'q str,
                parameters: &'e [DB::TypeInfo],
            ) -> BoxFuture<'e, Result<DB::Statement<'q>, sqlx::Error>>
            where
                'p: 'e,
            {
                Executor::prepare_with(&self.db, sql, parameters)
            }

            #[track_caller]
            fn describe<'e, 'q: 'e>(
                self,
                sql: &'q str,
            ) -> BoxFuture<'e, Result<Describe<DB>, sqlx::Error>>
            where
                'p: 'e,
            {
                Executor::describe(&self.db, sql)
            }
        }
    };
}

delegate_executor!(TenantPool);
delegate_executor!(AdminPool);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn displays_as_compares_exactly() {
        assert!(displays_as(&"acme", "acme"));
        assert!(displays_as(&format_args!("{}{}", "ac", "me"), "acme"));
        assert!(!displays_as(&"acme", "acm"));
        assert!(!displays_as(&"acm", "acme"));
        assert!(!displays_as(&"globex", "acme"));
        assert!(!displays_as(&"", "acme"));
        assert!(displays_as(&42, "42"));
    }

    #[test]
    fn names_are_checked() {
        assert!(is_setting_name("app.tenant_id"));
        assert!(is_setting_name("a.b.c"));
        for bad in [
            "tenant",
            "app.",
            ".x",
            "app.tenant-id",
            "app.t'; DROP",
            "é.x",
        ] {
            assert!(!is_setting_name(bad), "{bad}");
        }
        assert!(is_identifier("tenant_id"));
        assert!(is_identifier("_x9"));
        for bad in ["", "9x", "a b", "a\"b", "a.b", &"x".repeat(64)] {
            assert!(!is_identifier(bad), "{bad}");
        }
    }
}
