// SPDX-License-Identifier: PostgreSQL
/*
 * pgr_bench peer: HikariCP (with the PostgreSQL JDBC driver), run by pgr_bench as a child
 * process with `java -cp <jars> HikariPeer.java` (single-file source launch, no build step).
 *
 * Protocol (bench/README.md, "Peers"): the server comes in the
 * environment (PGR_PEER_HOST, _PORT, _USER, _PASSWORD, _DBNAME, _SSL); the peer prints one line,
 * "ready <versions>", then answers each "run <query> <threads> <conns> <hold_ns> <warmup_s>
 * <secs> <sample_every>" line on stdin with "ok <ops> <errors> <secs> <sum_ns> <max_ns> <hist>"
 * or "fail <reason>", and exits at "quit" or end of input.
 *
 * Threads: one Java platform thread per harness thread, the same loop as the C harness's
 * worker_main. The JIT is warmed before the first counted round of each query kind
 * (PGR_PEER_FIRST_WARMUP seconds of uncounted work on top of the round's own warm-up), so the
 * counted windows measure C2-compiled code.
 */
import com.zaxxer.hikari.HikariConfig;
import com.zaxxer.hikari.HikariDataSource;
import java.io.BufferedReader;
import java.io.InputStreamReader;
import java.sql.Connection;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.Statement;
import java.util.HashSet;
import java.util.Set;
import java.util.concurrent.CyclicBarrier;
import java.util.concurrent.locks.LockSupport;

public class HikariPeer {
	static final int PHASE_WARMUP = 0, PHASE_MEASURE = 1, PHASE_STOP = 2;
	static final int LOOKUP_ROWS = 10000;

	/* pgring's log-linear histogram (src/hist.h): 16 linear buckets, then 4 per power of
	 * two up to 2^44 ns. The harness merges the counts into its own snapshot. */
	static final int HIST_BUCKETS = 16 + (44 - 4 + 1) * 4;

	static int bucket(long v)
	{
		if (v < 16)
			return (int)Math.max(v, 0);
		int e = 63 - Long.numberOfLeadingZeros(v);
		if (e > 44)
			return HIST_BUCKETS - 1;
		int sub = (int)(v >>> (e - 2)) & 3;
		return 16 + (e - 4) * 4 + sub;
	}

	static volatile int phase;

	static final class Worker extends Thread {
		final HikariDataSource ds;
		final CyclicBarrier barrier;
		final String query;
		final long holdNs, mask;
		long rng, ops, errors, sum, max;
		final long[] hist = new long[HIST_BUCKETS];

		Worker(HikariDataSource ds, CyclicBarrier barrier, String query, long holdNs,
		       long sampleEvery, long seed)
		{
			this.ds = ds;
			this.barrier = barrier;
			this.query = query;
			this.holdNs = holdNs;
			this.mask = sampleEvery - 1;
			this.rng = seed | 1;
		}

		long next()
		{
			long x = rng;
			x ^= x << 13;
			x ^= x >>> 7;
			x ^= x << 17;
			return rng = x;
		}

		/* 0 when the query returned exactly one row. */
		int runQuery(Connection c) throws Exception
		{
			int rows = 0;
			if (query.equals("select1")) {
				try (Statement st = c.createStatement();
				     ResultSet rs = st.executeQuery("SELECT 1")) {
					while (rs.next())
						rows++;
				}
			} else {
				try (PreparedStatement ps = c.prepareStatement(
				         "SELECT name FROM pgr_bench_users WHERE id = ?")) {
					ps.setInt(1, (int)Long.remainderUnsigned(next(), LOOKUP_ROWS) + 1);
					try (ResultSet rs = ps.executeQuery()) {
						while (rs.next())
							rows++;
					}
				}
			}
			return rows == 1 ? 0 : -1;
		}

		@Override public void run()
		{
			try {
				barrier.await();
			} catch (Exception e) {
				return;
			}
			final boolean q = !query.equals("none");
			int ph = phase;
			while (ph != PHASE_STOP) {
				boolean timed = (next() & mask) == 0;
				long t0 = timed ? System.nanoTime() : 0, lat = 0;
				Connection c;
				try {
					c = ds.getConnection();
				} catch (Exception e) {
					ph = phase;
					if (ph == PHASE_MEASURE)
						errors++;
					LockSupport.parkNanos(1000000);
					continue;
				}
				int rc = 0;
				if (!q && (timed || holdNs > 0)) {
					long t1 = System.nanoTime();
					lat = t1 - t0;
					while (holdNs > 0 && System.nanoTime() - t1 < holdNs)
						;
				}
				if (q) {
					try {
						rc = runQuery(c);
					} catch (Exception e) {
						rc = -1;
					}
				}
				try {
					c.close();
				} catch (Exception e) {
					rc = -1;
				}
				if (timed && q)
					lat = System.nanoTime() - t0;
				ph = phase;
				if (ph == PHASE_MEASURE) {
					if (rc != 0) {
						errors++;
					} else {
						ops++;
						if (timed) {
							hist[bucket(lat)]++;
							sum += lat;
							if (lat > max)
								max = lat;
						}
					}
				}
			}
		}
	}

	static String env(String k, String def)
	{
		String v = System.getenv(k);
		return v == null ? def : v;
	}

	static final Set<String> warmed = new HashSet<>();

	static void sleepSecs(double s) throws InterruptedException
	{
		long until = System.nanoTime() + (long)(s * 1e9);
		for (long left; (left = until - System.nanoTime()) > 0;)
			Thread.sleep(left / 1000000, (int)(left % 1000000));
	}

	static String runRound(String[] a) throws Exception
	{
		String query = a[1];
		int threads = Integer.parseInt(a[2]), conns = Integer.parseInt(a[3]);
		long holdNs = Long.parseLong(a[4]);
		double warmup = Double.parseDouble(a[5]), secs = Double.parseDouble(a[6]);
		long sampleEvery = Long.parseLong(a[7]);
		if (!warmed.contains(query)) {
			warmed.add(query);
			warmup += Double.parseDouble(env("PGR_PEER_FIRST_WARMUP", "0"));
		}

		HikariConfig cfg = new HikariConfig();
		cfg.setJdbcUrl("jdbc:postgresql://" + env("PGR_PEER_HOST", "127.0.0.1") + ":" +
		               env("PGR_PEER_PORT", "5432") + "/" + env("PGR_PEER_DBNAME", "postgres"));
		cfg.setUsername(env("PGR_PEER_USER", "postgres"));
		String pw = env("PGR_PEER_PASSWORD", "");
		if (!pw.isEmpty())
			cfg.setPassword(pw);
		cfg.addDataSourceProperty("sslmode",
		                          env("PGR_PEER_SSL", "0").equals("1") ? "require" : "disable");
		cfg.setMaximumPoolSize(conns);
		cfg.setMinimumIdle(conns);
		cfg.setConnectionTimeout(10000); /* the harness's per-checkout deadline */
		cfg.setPoolName("pgr_bench");
		HikariDataSource ds = new HikariDataSource(cfg);
		try {
			/* Opened in the background by HikariCP's own executor: wait until all are idle,
			 * so that no connect is measured. */
			long deadline = System.nanoTime() + 20_000_000_000L;
			while (ds.getHikariPoolMXBean().getIdleConnections() < conns) {
				if (System.nanoTime() > deadline)
					return "fail only " + ds.getHikariPoolMXBean().getIdleConnections() +
					    " of " + conns + " connections idle after 20 s";
				Thread.sleep(2);
			}
			phase = PHASE_WARMUP;
			CyclicBarrier barrier = new CyclicBarrier(threads + 1);
			Worker[] ws = new Worker[threads];
			long seed = System.nanoTime() | 1;
			for (int i = 0; i < threads; i++) {
				seed ^= seed << 13;
				seed ^= seed >>> 7;
				seed ^= seed << 17;
				ws[i] = new Worker(ds, barrier, query, holdNs, sampleEvery, seed);
				ws[i].start();
			}
			barrier.await();
			sleepSecs(warmup);
			long t0 = System.nanoTime();
			phase = PHASE_MEASURE;
			sleepSecs(secs);
			phase = PHASE_STOP;
			long t1 = System.nanoTime();
			long ops = 0, errors = 0, sum = 0, max = 0;
			long[] hist = new long[HIST_BUCKETS];
			for (Worker w : ws) {
				w.join();
				ops += w.ops;
				errors += w.errors;
				sum += w.sum;
				max = Math.max(max, w.max);
				for (int i = 0; i < HIST_BUCKETS; i++)
					hist[i] += w.hist[i];
			}
			StringBuilder sb = new StringBuilder();
			for (int i = 0; i < HIST_BUCKETS; i++)
				if (hist[i] != 0)
					sb.append(sb.length() == 0 ? "" : ",").append(i).append(':').append(hist[i]);
			return "ok " + ops + " " + errors + " " + String.format("%.6f", (t1 - t0) / 1e9) + " " +
			    sum + " " + max + " " + (sb.length() == 0 ? "-" : sb.toString());
		} finally {
			ds.close();
		}
	}

	static String hikariVersion()
	{
		java.util.Properties p = new java.util.Properties();
		try (java.io.InputStream in = HikariDataSource.class.getResourceAsStream(
		         "/META-INF/maven/com.zaxxer/HikariCP/pom.properties")) {
			if (in != null)
				p.load(in);
		} catch (java.io.IOException e) {
		}
		return p.getProperty("version", "(version unknown)");
	}

	public static void main(String[] args) throws Exception
	{
		System.out.println("ready HikariCP " + hikariVersion() + ", pgjdbc " +
		                   org.postgresql.util.DriverInfo.DRIVER_VERSION + ", Java " +
		                   System.getProperty("java.vm.version"));
		System.out.flush();
		BufferedReader in = new BufferedReader(new InputStreamReader(System.in));
		for (String line; (line = in.readLine()) != null;) {
			String[] a = line.trim().split(" ");
			String reply;
			if (a[0].equals("quit"))
				break;
			if (!a[0].equals("run") || a.length != 8) {
				reply = "fail bad command: " + line;
			} else {
				try {
					reply = runRound(a);
				} catch (Throwable e) {
					reply = "fail " + e.toString().replace('\n', ' ');
				}
			}
			System.out.println(reply);
			System.out.flush();
		}
	}
}
