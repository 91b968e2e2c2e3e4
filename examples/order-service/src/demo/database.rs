//! The demo's temporary database: a fresh SQLite file, or a fresh schema on the PostgreSQL
//! server `DATABASE_URL` names; either is removed when the run ends (the schema with the two
//! roles the service made for it).

use sqlx::Connection as _;

use crate::app;

/// A database made for one run.
#[derive(Debug)]
pub(crate) enum TempDatabase {
    /// A SQLite file in the temp dir.
    Sqlite {
        /// Its path (the `-wal` and `-shm` files sit next to it).
        path: std::path::PathBuf,
    },
    /// A schema on a PostgreSQL server.
    Postgres {
        /// The server's URL as given.
        base: String,
        /// The schema's name.
        schema: String,
    },
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl TempDatabase {
    /// A fresh SQLite file when `url` is `None`; for a `postgres://` URL a fresh schema named
    /// after the run; any other URL is used as it is (`None` returned: nothing to remove).
    pub(crate) async fn create(
        url: Option<&str>,
        run_id: &str,
    ) -> Result<(String, Option<TempDatabase>), BoxError> {
        match url {
            None => {
                let dir = std::env::temp_dir().join("order-service");
                std::fs::create_dir_all(&dir)?;
                let path = dir.join(format!("demo-{run_id}.db"));
                Ok((app::sqlite_url(&path), Some(TempDatabase::Sqlite { path })))
            }
            Some(base) if base.starts_with("postgres:") || base.starts_with("postgresql:") => {
                let schema = format!("order_service_demo_{run_id}");
                let mut conn = sqlx::PgConnection::connect(base).await?;
                sqlx::query(&format!("CREATE SCHEMA {schema}"))
                    .execute(&mut conn)
                    .await?;
                conn.close().await?;
                let sep = if base.contains('?') { '&' } else { '?' };
                let url = format!("{base}{sep}options%5Bsearch_path%5D={schema}");
                let temp = TempDatabase::Postgres {
                    base: base.to_owned(),
                    schema,
                };
                Ok((url, Some(temp)))
            }
            Some(other) => Ok((other.to_owned(), None)),
        }
    }

    /// Removes the file or drops the schema.
    pub(crate) async fn remove(self) -> Result<(), BoxError> {
        match self {
            TempDatabase::Sqlite { path } => {
                for suffix in ["", "-wal", "-shm"] {
                    let file = format!("{}{suffix}", path.display());
                    match std::fs::remove_file(&file) {
                        Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
                            return Err(format!("removing {file}: {err}").into())
                        }
                        _ => {}
                    }
                }
                Ok(())
            }
            TempDatabase::Postgres { base, schema } => {
                crate::db::postgres::drop_schema_and_roles(&base, &schema).await?;
                Ok(())
            }
        }
    }
}
