//! PostgreSQL set-up from a superuser `DATABASE_URL`: two roles, the schema, row-level security.
//!
//! - **The owner role** (`<database>_<schema>_owner`, `NOLOGIN BYPASSRLS`) owns the tables and
//!   runs the migration. The cross-tenant pool ([`AdminPool`]) connects with the superuser URL
//!   and runs `SET ROLE` to it, so it has the owner's rights, not a superuser's.
//! - **The application role** (`<database>_<schema>_app`, `LOGIN NOBYPASSRLS`, owns nothing)
//!   serves every tenant request through a [`TenantPool`], which sets `app.tenant_id` in each
//!   transaction and refuses to start if the role could see past the policies.
//! - Every table with a `tenant_id` has `ENABLE` and `FORCE ROW LEVEL SECURITY` and the policy
//!   `tenant_id = current_setting('app.tenant_id', true)`, for reads (`USING`) and writes
//!   (`WITH CHECK`), made by [`AdminPool::enable_row_level_security`].
//!
//! Roles are cluster-wide: the names carry the database and the schema, so services on other
//! schemas never share them, and the set-up runs under a transaction-level advisory lock, so
//! two instances starting at once on one schema take turns. A role that exists is used as it
//! is: the set-up never changes its attributes, and the [`TenantPool`] check refuses an
//! application role that was given `BYPASSRLS` or made a superuser.
//!
//! Each pool names its sessions after its role (`application_name`), so this service's
//! connections and log lines can be told apart on a shared server.
//!
//! When the superuser URL carries a password, the application role gets one derived from it
//! (`sha256` of the role name and that password, computed here, never sent as a query
//! parameter the server could log): every instance
//! derives the same, and nobody without the superuser's password can.

use std::time::Duration;

use contextflow_sqlx::{AdminPool, TenantPool, DEFAULT_COLUMN, DEFAULT_SETTING};
use sqlx::{any::AnyPoolOptions, Any, AnyConnection, Connection as _, Executor as _, Row as _};

use super::ConnectError;
use crate::context::TENANT;

/// The tables that hold tenant data: each gets row-level security.
pub const TENANT_TABLES: [&str; 4] = ["inventory", "orders", "order_items", "outbox"];

/// The names of the two roles of one database and schema.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Roles {
    /// Owns the tables and runs the migration (`NOLOGIN BYPASSRLS`).
    pub owner: String,
    /// Serves tenant requests (`LOGIN NOBYPASSRLS`, owns nothing).
    pub app: String,
}

/// The pools of a PostgreSQL database set up for row-level security.
pub(super) struct Pools {
    pub(super) tenant: TenantPool<Any>,
    pub(super) admin: AdminPool<Any>,
    pub(super) roles: Roles,
}

impl Roles {
    /// The roles for `schema` in `database`: `<database>_<schema>_owner` and `..._app`,
    /// lower-case letters, digits and `_`; a long prefix is cut and given a hash of the whole,
    /// so every name fits PostgreSQL's 63 bytes and stays distinct.
    pub fn for_schema(database: &str, schema: &str) -> Roles {
        let full: String = format!("{database}_{schema}")
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '_'
                }
            })
            .collect();
        let exact = full == format!("{database}_{schema}");
        // 63 bytes minus "_owner"; a changed name also gets the hash, so two names that only
        // differ in characters replaced by `_` stay apart.
        let base = if full.len() <= 57 && exact {
            full
        } else {
            let hash = fnv1a(format!("{database}\0{schema}").as_bytes());
            format!("{}_{hash:08x}", &full[..full.len().min(48)])
        };
        Roles {
            owner: format!("{base}_owner"),
            app: format!("{base}_app"),
        }
    }
}

/// Creates the roles and the schema from the superuser `url` and returns the pools: the
/// tenant pool as the application role (checked by [`TenantPool::new`]), the admin pool as the
/// owner.
pub(super) async fn connect(url: &str, max_connections: u32) -> Result<Pools, ConnectError> {
    let mut conn = AnyConnection::connect(url).await?;
    let row = sqlx::query(
        "SELECT current_database()::text, current_schema()::text, r.rolsuper
         FROM pg_roles r WHERE r.rolname = session_user",
    )
    .fetch_one(&mut conn)
    .await?;
    let database: String = row.try_get(0)?;
    let schema: Option<String> = row.try_get(1)?;
    let superuser: bool = row.try_get(2)?;
    let Some(schema) = schema else {
        return Err(ConnectError::Config(
            "no schema of the search path exists: create it first".into(),
        ));
    };
    if !superuser {
        return Err(ConnectError::Config(
            "DATABASE_URL must name a superuser on PostgreSQL: the service creates its owner \
             and application roles from it and serves as the application role"
                .into(),
        ));
    }
    let roles = Roles::for_schema(&database, &schema);
    let parsed = url::Url::parse(url).map_err(|e| ConnectError::Config(e.to_string()))?;
    let password = match parsed.password() {
        Some(password) => Some(derived_password(&roles.app, password)),
        None => None,
    };
    create_roles(&mut conn, &schema, &roles, password.as_deref()).await?;
    conn.close().await?;

    let owner = roles.owner.clone();
    let admin = AnyPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(Duration::from_secs(30))
        .test_before_acquire(false)
        .after_connect(move |conn, _| {
            let set_role = format!("SET ROLE {}", quote(&owner));
            Box::pin(async move {
                conn.execute(set_role.as_str()).await?;
                Ok(())
            })
        })
        .connect(&with_user(&parsed, None, None, &roles.owner))
        .await?;
    let admin = AdminPool::new(admin);
    migrate(&admin, &schema, &roles).await?;

    let app_url = with_user(&parsed, Some(&roles.app), password.as_deref(), &roles.app);
    let app = AnyPoolOptions::new()
        .max_connections(max_connections)
        // No ping before each use: a round trip per transaction; a broken connection fails its
        // first statement, which fails the request.
        .test_before_acquire(false)
        .connect(&app_url)
        .await?;
    let tenant = TenantPool::new(app, &TENANT).await?;
    Ok(Pools {
        tenant,
        admin,
        roles,
    })
}

/// Drops `schema` and its two roles, connected as a superuser to `url`'s database: what a
/// temporary schema (the demo's, a test's) leaves behind, since roles outlive schemas.
///
/// # Errors
/// Database errors.
pub async fn drop_schema_and_roles(url: &str, schema: &str) -> Result<(), sqlx::Error> {
    sqlx::any::install_default_drivers();
    let mut conn = AnyConnection::connect(url).await?;
    let sql = format!("DROP SCHEMA IF EXISTS {} CASCADE", quote(schema));
    conn.execute(sql.as_str()).await?;
    let database: String = sqlx::query_scalar("SELECT current_database()::text")
        .fetch_one(&mut conn)
        .await?;
    let roles = Roles::for_schema(&database, schema);
    for role in [&roles.app, &roles.owner] {
        let exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1)")
                .bind(role.as_str())
                .fetch_one(&mut conn)
                .await?;
        if exists {
            for sql in [
                format!("DROP OWNED BY {}", quote(role)),
                format!("DROP ROLE {}", quote(role)),
            ] {
                conn.execute(sql.as_str()).await?;
            }
        }
    }
    conn.close().await
}

/// Creates the roles that are missing, gives the owner the schema and the tables that exist
/// already (made by an earlier version as the superuser), lets the application role use the
/// schema. One transaction, under the schema's advisory lock.
async fn create_roles(
    conn: &mut AnyConnection,
    schema: &str,
    roles: &Roles,
    app_password: Option<&str>,
) -> Result<(), sqlx::Error> {
    let mut tx = conn.begin().await?;
    lock(&mut tx, schema).await?;
    for (role, attributes) in [
        (&roles.owner, "NOLOGIN BYPASSRLS"),
        (
            &roles.app,
            "LOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE NOINHERIT",
        ),
    ] {
        let exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1)")
                .bind(role.as_str())
                .fetch_one(&mut *tx)
                .await?;
        if !exists {
            let sql = format!("CREATE ROLE {} {attributes}", quote(role));
            (&mut *tx).execute(sql.as_str()).await?;
        }
    }
    if let Some(password) = app_password {
        // The SCRAM verifier, not the password: PostgreSQL stores it as given, and a statement
        // log (`log_statement = ddl`, or the STATEMENT line of a failed command) then shows
        // nothing that logs in. Base64 and `$:` only: safe in a literal (ALTER ROLE takes no
        // parameters).
        let verifier = scram_verifier(password, &uuid::Uuid::new_v4().into_bytes());
        let sql = format!("ALTER ROLE {} PASSWORD '{verifier}'", quote(&roles.app));
        // The statement holds the password: sqlx's own statement logs (a slow statement is a
        // WARN line with its whole text) must not see it.
        use tracing::instrument::WithSubscriber as _;
        (&mut *tx)
            .execute(sql.as_str())
            .with_subscriber(tracing::subscriber::NoSubscriber::default())
            .await?;
    }
    let schema_q = quote(schema);
    for sql in [
        format!(
            "GRANT USAGE, CREATE ON SCHEMA {schema_q} TO {}",
            quote(&roles.owner)
        ),
        format!("GRANT USAGE ON SCHEMA {schema_q} TO {}", quote(&roles.app)),
    ] {
        (&mut *tx).execute(sql.as_str()).await?;
    }
    let sql = format!(
        "SELECT c.relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = $1 AND c.relkind IN ('r', 'p') AND c.relname::text IN ('{}')
           AND pg_get_userbyid(c.relowner)::text <> $2",
        TENANT_TABLES.join("', '")
    );
    let foreign: Vec<String> = sqlx::query_scalar(&sql)
        .bind(schema)
        .bind(roles.owner.as_str())
        .fetch_all(&mut *tx)
        .await?;
    for table in foreign {
        let sql = format!(
            "ALTER TABLE {schema_q}.{} OWNER TO {}",
            quote(&table),
            quote(&roles.owner)
        );
        (&mut *tx).execute(sql.as_str()).await?;
    }
    tx.commit().await
}

/// As the owner: the tables, row-level security on each, the application role's grants. One
/// transaction, under the schema's advisory lock.
async fn migrate(admin: &AdminPool<Any>, schema: &str, roles: &Roles) -> Result<(), sqlx::Error> {
    admin
        .transaction(|| async {
            sqlx::query("SELECT pg_advisory_xact_lock(hashtext('order-service:' || $1))")
                .bind(schema)
                .execute(&**admin)
                .await?;
            for statement in super::schema_statements(super::Backend::Postgres) {
                admin.execute(sqlx::query(&statement)).await?;
            }
            // A database made by an older build.
            admin
                .execute(sqlx::query(
                    "ALTER TABLE orders ADD COLUMN IF NOT EXISTS payment_key TEXT",
                ))
                .await?;
            for table in TENANT_TABLES {
                admin
                    .enable_row_level_security(table, DEFAULT_COLUMN, DEFAULT_SETTING)
                    .await?;
            }
            let app = quote(&roles.app);
            let sql = format!(
                "GRANT SELECT, INSERT, UPDATE ON {} TO {app}",
                TENANT_TABLES.join(", ")
            );
            admin.execute(sqlx::query(&sql)).await?;
            let sequences: Vec<String> = sqlx::query_scalar(
                "SELECT pg_get_serial_sequence('orders', 'id') UNION ALL
                 SELECT pg_get_serial_sequence('outbox', 'id')",
            )
            .fetch_all(&**admin)
            .await?;
            let sql = format!("GRANT USAGE ON SEQUENCE {} TO {app}", sequences.join(", "));
            admin.execute(sqlx::query(&sql)).await?;
            Ok::<_, sqlx::Error>(())
        })
        .await
}

/// The schema's advisory lock, for the rest of the transaction.
async fn lock(conn: &mut AnyConnection, schema: &str) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('order-service:' || $1))")
        .bind(schema)
        .execute(conn)
        .await
        .map(drop)
}

/// The application role's password: hex of `sha256` over the role and the superuser's
/// password. Computed here: sent to the server as a query parameter, the superuser's password
/// would be in the server's log wherever statements are logged with their parameters
/// (`log_statement = all`, `log_min_duration_statement`).
fn derived_password(role: &str, superuser_password: &str) -> String {
    use sha2::{Digest as _, Sha256};
    let password = percent_decode(superuser_password);
    let digest = Sha256::digest(format!("order-service app role\n{role}\n{password}"));
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// `url` logging in as `user` (with `password`) when given, and naming itself
/// `application_name` (so its sessions and log lines can be told apart).
fn with_user(
    url: &url::Url,
    user: Option<&str>,
    password: Option<&str>,
    application_name: &str,
) -> String {
    let mut url = url.clone();
    let pairs: Vec<(String, String)> = url
        .query_pairs()
        .filter(|(key, _)| {
            let login = matches!(key.as_ref(), "user" | "password");
            key != "application_name" && !(user.is_some() && login)
        })
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    url.query_pairs_mut()
        .clear()
        .extend_pairs(pairs)
        .append_pair("application_name", application_name);
    if let Some(user) = user {
        // Setting a user and password only fails on URLs without a host, which a PostgreSQL
        // URL that just connected has.
        let _ = url.set_username(user);
        let _ = url.set_password(password);
    }
    url.into()
}

/// `name` as a quoted SQL identifier.
fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `%XX` escapes decoded (a URL's password, a query key), bytes that are not UTF-8 replaced.
pub(crate) fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (
            bytes[i],
            bytes.get(i + 1).copied().and_then(hex),
            bytes.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(high), Some(low)) => {
                out.push((high * 16 + low) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// 32-bit FNV-1a: a stable short hash for role names.
fn fnv1a(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5, |hash, &b| {
        (hash ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

/// PostgreSQL's SCRAM-SHA-256 verifier of `password` with `salt` (RFC 5802, RFC 7677; the
/// format of `pg_authid.rolpassword`): `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`.
/// The password is ASCII (hex digits), which SASLprep leaves as it is.
fn scram_verifier(password: &str, salt: &[u8]) -> String {
    use base64::{engine::general_purpose::STANDARD, Engine as _};
    use hmac::{Hmac, Mac as _};
    use sha2::{Digest as _, Sha256};
    const ITERATIONS: u32 = 4096;
    let mac = |key: &[u8], data: &[&[u8]]| -> [u8; 32] {
        let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
        for part in data {
            mac.update(part);
        }
        mac.finalize().into_bytes().into()
    };
    // Hi(): PBKDF2-HMAC-SHA-256 with one 32-byte block.
    let mut u = mac(password.as_bytes(), &[salt, &1u32.to_be_bytes()]);
    let mut salted = u;
    for _ in 1..ITERATIONS {
        u = mac(password.as_bytes(), &[&u]);
        for (s, b) in salted.iter_mut().zip(u) {
            *s ^= b;
        }
    }
    let client_key = mac(&salted, &[b"Client Key"]);
    let stored_key: [u8; 32] = Sha256::digest(client_key).into();
    let server_key = mac(&salted, &[b"Server Key"]);
    format!(
        "SCRAM-SHA-256${ITERATIONS}:{}${}:{}",
        STANDARD.encode(salt),
        STANDARD.encode(stored_key),
        STANDARD.encode(server_key)
    )
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// Against an independent implementation (Python's `hashlib.pbkdf2_hmac` and `hmac`, the
    /// RFC 5802 formulas), for the RFC 7677 example's password and a fixed salt.
    #[test]
    fn scram_verifier_matches_an_independent_implementation() {
        let salt: Vec<u8> = (0..16).collect();
        assert_eq!(
            scram_verifier("pencil", &salt),
            "SCRAM-SHA-256$4096:AAECAwQFBgcICQoLDA0ODw==$zHCdol2044/ZyWzPLi7oxApCkamKw9Z+E4U/QApd/5Y=:dd5peBOitVnLNFu7VmwP+HiDaaw4OUCv396eVCWhYiE="
        );
    }

    /// The same password as the server-side `sha256` the service used before (checked with
    /// PostgreSQL's `encode(sha256(convert_to(...)), 'hex')` and Python's `hashlib`), so a role
    /// made by an older build still logs in.
    #[test]
    fn derived_password_matches_the_server_side_digest() {
        assert_eq!(
            derived_password("order_app_x", "p%C3%A4ss%20word"),
            "0b12d705993015d9aee3e95ee73099f898cf587c1e00c87958407497b376c133"
        );
    }

    #[test]
    fn role_names() {
        assert_eq!(
            Roles::for_schema("test", "public"),
            Roles {
                owner: "test_public_owner".into(),
                app: "test_public_app".into()
            }
        );
        let long = Roles::for_schema("test", &format!("order_service_{}", "a".repeat(32)));
        assert!(
            long.owner.len() <= 63 && long.owner.ends_with("_owner"),
            "{long:?}"
        );
        // Names that differ only in characters replaced by `_` stay apart.
        assert_ne!(
            Roles::for_schema("db", "a-b"),
            Roles::for_schema("db", "a_b")
        );
        assert_eq!(percent_decode("p%40ss%2"), "p@ss%2");
    }

    proptest! {
        /// Any database and schema give two distinct names of at most 63 bytes, of lower-case
        /// letters, digits and `_`.
        #[test]
        fn role_names_are_valid(database in "\\PC{1,40}", schema in "\\PC{1,63}") {
            let roles = Roles::for_schema(&database, &schema);
            for name in [&roles.owner, &roles.app] {
                prop_assert!(name.len() <= 63, "{}", name);
                prop_assert!(name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'), "{}", name);
            }
            prop_assert_ne!(roles.owner, roles.app);
        }
    }
}
