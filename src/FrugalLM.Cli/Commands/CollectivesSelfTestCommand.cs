using System.CommandLine;
using System.Diagnostics;
using System.Globalization;
using FrugalLM.Distributed;
using FrugalLM.Native;
using TorchSharp;

namespace FrugalLM.Cli.Commands;

/// <summary>
/// <c>frugal collectives-selftest</c> (hidden): run under <c>frugal launch -n N --</c>, every rank checks every
/// collective of <see cref="ICollectives"/> on random data against a reference it computes alone. The data of all
/// ranks comes from one seed, so each rank can generate every rank's contribution and sum them itself in rank
/// order. Gathers and broadcasts must match exactly; sums may differ by fp32 reduction order (the backend adds in
/// another order), and bf16 results additionally by one bf16 rounding step of that difference. Rank 0 prints one
/// PASS/FAIL line per check with the largest error over all ranks; the exit code is 1 when any check failed.
/// Every check runs twice, the second time with tiny per-call and scratch limits so the paths that split large
/// tensors (beyond 2^31 elements in real use) run on small ones.
/// </summary>
internal static class CollectivesSelfTestCommand
{
    // Odd sizes per rank, so nothing lines up with vector widths or the split limits below.
    private static readonly int[] Sizes = [1, 7, 1001, 4099];
    private const int SplitElements = 97;
    private const int SplitScratch = 500;

    public static Command Create()
    {
        var seed = new Option<int>("--seed") { Description = "Seed of the random data (every rank must use the same)", DefaultValueFactory = _ => 1234 };
        var bench = new Option<bool>("--bench") { Description = "Also time the collectives on a 64 MiB fp32 buffer" };
        var mib = new Option<int>("--bench-mib") { Description = "Size of the unsharded buffer --bench times, in MiB", DefaultValueFactory = _ => 64 };
        var rounds = new Option<int>("--rounds") { Description = "Timed rounds per collective with --bench", DefaultValueFactory = _ => 10 };
        var command = new Command("collectives-selftest", "Check every collective against a single-process reference (run under frugal launch)")
        {
            seed, bench, mib, rounds,
        };
        command.Hidden = true;
        command.SetAction(pr => CliRunner.Run(() =>
        {
            if (pr.GetValue(mib) < 1 || pr.GetValue(rounds) < 1)
            {
                throw new ArgumentException("--bench-mib and --rounds must be at least 1");
            }
            TorchRuntime.Initialize();
            using var collectives = Collectives.Create();
            // Ranks share the machine's cores; libtorch's default of one thread per core in each would oversubscribe.
            torch.set_num_threads(Math.Max(1, Environment.ProcessorCount / collectives.WorldSize));
            try
            {
                return Run(collectives, pr.GetValue(seed), pr.GetValue(bench) ? pr.GetValue(mib) : 0, pr.GetValue(rounds));
            }
            catch (Exception e) when (collectives is MpiCollectives mpi)
            {
                // The other ranks would wait forever in their next collective: end the whole job.
                CliRunner.Error($"rank {collectives.Rank}: {e}");
                mpi.Abort(ExitCodes.Failure);
                throw;
            }
        }));
        return command;
    }

    private static int Run(ICollectives c, int seed, int benchMib, int rounds)
    {
        var results = new List<Check>();
        var mpi = c as MpiCollectives;
        foreach (bool split in mpi is null ? [false] : new[] { false, true })
        {
            if (mpi is not null)
            {
                mpi.MaxElementsPerCall = split ? SplitElements : int.MaxValue;
                mpi.ScratchElements = split ? SplitScratch : 1 << 24;
            }
            string suffix = split ? " (split)" : "";
            foreach (var dtype in new[] { torch.ScalarType.Float32, torch.ScalarType.BFloat16 })
            {
                var checks = new Checks(c, seed, dtype);
                results.Add(checks.AllGather($"all-gather{suffix}", inPlace: false, async: false));
                results.Add(checks.AllGather($"all-gather-in-place{suffix}", inPlace: true, async: false));
                results.Add(checks.AllGather($"all-gather-async{suffix}", inPlace: false, async: true));
                results.Add(checks.ReduceScatter($"reduce-scatter-sum{suffix}", ReduceOp.Sum, inPlace: false));
                results.Add(checks.ReduceScatter($"reduce-scatter-avg{suffix}", ReduceOp.Avg, inPlace: false));
                results.Add(checks.ReduceScatter($"reduce-scatter-in-place{suffix}", ReduceOp.Sum, inPlace: true));
                results.Add(checks.AllReduce($"all-reduce-sum{suffix}", ReduceOp.Sum));
                results.Add(checks.AllReduce($"all-reduce-avg{suffix}", ReduceOp.Avg));
                results.Add(checks.Broadcast($"broadcast{suffix}"));
            }
        }
        if (mpi is not null)
        {
            mpi.MaxElementsPerCall = int.MaxValue;
            mpi.ScratchElements = 1 << 24;
        }
        var barrier = Stopwatch.StartNew();
        c.Barrier();
        results.Add(new Check("barrier", "-", true, 0, $"{barrier.Elapsed.TotalMilliseconds:F1} ms"));
        results.Add(Validation(c));

        // Share every rank's verdicts and errors (with the all-gather just checked) so rank 0 reports all ranks.
        using var local = torch.tensor(results.SelectMany(r => new[] { r.Passed ? 1f : 0f, (float)r.MaxError }).ToArray());
        using var all = torch.empty(local.numel() * c.WorldSize, torch.ScalarType.Float32);
        c.AllGather(local, all);
        var table = all.view(c.WorldSize, results.Count, 2).data<float>().ToArray();
        bool allPassed = true;
        for (int i = 0; i < results.Count; i++)
        {
            bool passed = true;
            double error = 0;
            for (int rank = 0; rank < c.WorldSize; rank++)
            {
                passed &= table[(rank * results.Count + i) * 2] == 1f;
                error = Math.Max(error, table[(rank * results.Count + i) * 2 + 1]);
            }
            allPassed &= passed && results[i].Passed;
            if (c.Rank == 0)
            {
                var r = results[i];
                Console.Out.WriteLine(string.Create(CultureInfo.InvariantCulture,
                    $"{(passed ? "PASS" : "FAIL")} {r.Name} {r.Type} max_err={error:G3} {r.Note}"));
            }
        }
        if (c.Rank == 0)
        {
            Console.Out.WriteLine(string.Create(CultureInfo.InvariantCulture,
                $"{(allPassed ? "all passed" : "FAILED")}: {results.Count} checks at world size {c.WorldSize} ({c.Backend})"));
        }
        if (benchMib > 0)
        {
            Bench(c, benchMib, rounds);
        }
        return allPassed ? ExitCodes.Ok : ExitCodes.Failure;
    }

    /// <summary>Bad arguments must throw the shared checks' messages at every rank, before any rank communicates.</summary>
    private static Check Validation(ICollectives c)
    {
        int w = c.WorldSize;
        var problems = new List<string>();
        void Expect(string fragment, Action call)
        {
            try
            {
                call();
                problems.Add($"no error (expected '{fragment}')");
            }
            catch (ArgumentException e) when (e.Message.Contains(fragment, StringComparison.Ordinal))
            {
            }
            catch (ArgumentException e)
            {
                problems.Add($"'{e.Message}' lacks '{fragment}'");
            }
        }
        using var f = torch.zeros(4L * w, torch.ScalarType.Float32);
        using var b = torch.zeros(4L * w, torch.ScalarType.BFloat16);
        using var shard = torch.zeros(4, torch.ScalarType.Float32);
        using var odd = torch.zeros(4L * w + 1, torch.ScalarType.Float32);
        using var grid = torch.zeros(4, 2 * w, torch.ScalarType.Float32);
        using var transposed = grid.t();
        using var ints = torch.zeros(4, torch.ScalarType.Int64);
        Expect("same dtype", () => c.AllGather(shard, b));
        Expect("must hold world size", () => c.AllGather(shard, odd));
        Expect(w > 1 ? "does not divide by the world size" : "must hold input", () => c.ReduceScatter(odd, shard, ReduceOp.Sum));
        Expect("not contiguous", () => c.AllReduce(transposed, ReduceOp.Sum));
        Expect("take Float32, BFloat16 or Float16", () => c.Broadcast(ints, 0));
        Expect("root must be a rank", () => c.Broadcast(f, w));
        return new Check("validation", "-", problems.Count == 0, 0, string.Join("; ", problems));
    }

    private static void Bench(ICollectives c, int mib, int rounds)
    {
        long total = (long)mib * 1024 * 1024 / 4 / c.WorldSize * c.WorldSize;
        using var full = torch.randn(total);
        using var shard = torch.randn(total / c.WorldSize);
        using var whole = torch.randn(total);
        void Time(string name, Action call)
        {
            var times = new List<double>();
            for (int i = 0; i < rounds + 2; i++)
            {
                c.Barrier();
                var clock = Stopwatch.StartNew();
                call();
                if (i >= 2)
                {
                    times.Add(clock.Elapsed.TotalMilliseconds);
                }
            }
            times.Sort();
            if (c.Rank == 0)
            {
                Console.Out.WriteLine(string.Create(CultureInfo.InvariantCulture,
                    $"BENCH {name} fp32 {mib} MiB unsharded, {c.WorldSize} ranks: median {times[times.Count / 2]:F1} ms, min {times[0]:F1} ms, max {times[^1]:F1} ms ({rounds} rounds)"));
            }
        }
        Time("all-gather", () => c.AllGather(shard, full));
        Time("all-gather-async", () =>
        {
            using var request = c.AllGatherAsync(shard, full);
            request.Wait();
        });
        Time("reduce-scatter-ring", () => c.ReduceScatter(full, shard, ReduceOp.Sum));
        Time("all-reduce", () => c.AllReduce(whole, ReduceOp.Sum));
        Time("broadcast", () => c.Broadcast(whole, 0));
    }

    private sealed record Check(string Name, string Type, bool Passed, double MaxError, string Note);

    /// <summary>The checks of one dtype; each draws its data from its own seeded generator, identically on every rank.</summary>
    private sealed class Checks(ICollectives c, int seed, torch.ScalarType dtype)
    {
        private const double Fp32Epsilon = 1.0 / (1 << 23);
        private const double Bf16Epsilon = 1.0 / (1 << 7);
        private readonly int w = c.WorldSize;
        private readonly int r = c.Rank;
        private int draws;

        private string TypeName => dtype == torch.ScalarType.Float32 ? "fp32" : "bf16";

        public Check AllGather(string name, bool inPlace, bool async)
        {
            var result = new Outcome();
            foreach (int n in Sizes)
            {
                using var data = Draw(w, n);
                using var mine = data[r].clone();
                using var output = torch.full(w * (long)n, float.NaN, dtype);
                using var view = output.view(w, n);
                torch.Tensor input = mine;
                if (inPlace)
                {
                    view[r].copy_(mine);
                    input = output.narrow(0, r * (long)n, n);
                }
                if (async)
                {
                    using var request = c.AllGatherAsync(input, output);
                    request.Wait();
                }
                else
                {
                    c.AllGather(input, output);
                }
                result.Exact(view, data);
                if (inPlace)
                {
                    input.Dispose();
                }
            }
            return result.Done(name, TypeName, "exact");
        }

        public Check ReduceScatter(string name, ReduceOp op, bool inPlace)
        {
            var result = new Outcome();
            foreach (int n in Sizes)
            {
                using var data = Draw(w, w * (long)n);
                using var input = data[r].clone();
                using var expected = Reference(data, op);
                using var mine = expected.view(w, n)[r];
                using var bound = Bound(data, op).view(w, n)[r];
                torch.Tensor output = inPlace ? input.narrow(0, r * (long)n, n) : torch.full(n, float.NaN, dtype);
                c.ReduceScatter(input, output, op);
                result.Close(output, mine, bound, dtype);
                output.Dispose();
            }
            return result.Done(name, TypeName, Tolerance);
        }

        public Check AllReduce(string name, ReduceOp op)
        {
            var result = new Outcome();
            foreach (int n in Sizes)
            {
                // Not a multiple of the world size: all-reduce has no such requirement.
                using var data = Draw(w, w * (long)n + 3);
                using var tensor = data[r].clone();
                using var expected = Reference(data, op);
                using var bound = Bound(data, op);
                c.AllReduce(tensor, op);
                result.Close(tensor, expected, bound, dtype);
                // Every rank must hold the very same bits, or replicated weights drift apart step by step.
                using var everyone = torch.empty(w * tensor.numel(), dtype);
                c.AllGather(tensor, everyone);
                using var rows = everyone.view(w, -1);
                using var first = rows[0].unsqueeze(0);
                if (!rows.eq(first).all().item<bool>())
                {
                    result.Fail("ranks disagree");
                }
            }
            return result.Done(name, TypeName, Tolerance + ", same bits on every rank");
        }

        public Check Broadcast(string name)
        {
            var result = new Outcome();
            int root = w - 1;
            foreach (int n in Sizes)
            {
                using var data = Draw(w, n);
                using var tensor = data[r].clone();
                c.Broadcast(tensor, root);
                using var expected = data[root];
                result.Exact(tensor, expected);
            }
            return result.Done(name, TypeName, $"exact, root {root}");
        }

        private string Tolerance => dtype == torch.ScalarType.Float32
            ? "tol=fp32 reduction order"
            : "tol=fp32 reduction order + 1 bf16 rounding";

        private torch.Tensor Draw(int rows, long columns)
        {
            using var generator = new torch.Generator((ulong)(seed * 1000L + draws++));
            using var values = torch.randn([rows, columns], generator: generator);
            return values.to(dtype);
        }

        /// <summary>The reduction a single process computes: fp32 sums in rank order, divided, rounded to the dtype.</summary>
        private static torch.Tensor Reference(torch.Tensor data, ReduceOp op)
        {
            using var wide = data.to(torch.ScalarType.Float32);
            var sum = wide[0].clone();
            for (int k = 1; k < wide.shape[0]; k++)
            {
                using var row = wide[k];
                sum.add_(row);
            }
            if (op == ReduceOp.Avg)
            {
                // Element by element, as the backends divide (libtorch may multiply by the reciprocal instead).
                var values = sum.data<float>().ToArray();
                for (int i = 0; i < values.Length; i++)
                {
                    values[i] /= wide.shape[0];
                }
                sum.Dispose();
                sum = torch.tensor(values);
            }
            using (sum)
            {
                return sum.to(data.dtype);
            }
        }

        /// <summary>
        /// The fp32 reduction-order bound per element: any order of summing W terms errs by at most
        /// (W - 1) x eps x sum of |terms| (W used, for margin), scaled like the result for an average.
        /// </summary>
        private static torch.Tensor Bound(torch.Tensor data, ReduceOp op)
        {
            long worldSize = data.shape[0];
            using var wide = data.to(torch.ScalarType.Float32);
            using var magnitude = wide.abs().sum(new long[] { 0 });
            return magnitude.mul(worldSize * Fp32Epsilon / (op == ReduceOp.Avg ? worldSize : 1));
        }

        private sealed class Outcome
        {
            private double maxError;
            private bool passed = true;
            private string? problem;

            public void Exact(torch.Tensor got, torch.Tensor expected)
            {
                using var wide = got.to(torch.ScalarType.Float32);
                using var reference = expected.to(torch.ScalarType.Float32);
                using var difference = (wide - reference).abs();
                maxError = Math.Max(maxError, double.IsNaN(difference.max().item<float>()) ? double.PositiveInfinity : difference.max().item<float>());
                passed &= wide.eq(reference).all().item<bool>();
            }

            public void Close(torch.Tensor got, torch.Tensor expected, torch.Tensor bound, torch.ScalarType dtype)
            {
                using var wide = got.to(torch.ScalarType.Float32);
                using var reference = expected.to(torch.ScalarType.Float32);
                using var difference = (wide - reference).abs();
                float largest = difference.max().item<float>();
                maxError = Math.Max(maxError, float.IsNaN(largest) ? double.PositiveInfinity : largest);
                // bf16: the two fp32 sums may fall either side of a rounding boundary, one bf16 step apart.
                using var rounding = dtype == torch.ScalarType.BFloat16
                    ? torch.maximum(wide.abs(), reference.abs()).mul(Bf16Epsilon)
                    : torch.zeros_like(wide);
                using var tolerance = bound + rounding;
                passed &= difference.le(tolerance).all().item<bool>();
            }

            public void Fail(string why)
            {
                passed = false;
                problem = why;
            }

            public Check Done(string name, string type, string note) =>
                new(name, type, passed, maxError, problem is null ? note : $"{note}: {problem}");
        }
    }
}
