using System.CommandLine;
using System.Globalization;
using System.Text;
using FrugalLM.IO;
using FrugalLM.Native;
using FrugalLM.Quantization;

namespace FrugalLM.Cli.Commands;

/// <summary>
/// <c>frugal bench int8-kernels</c>: the int8 speed table of docs/int8.md (<see cref="Int8Benchmarks"/>), the
/// <see cref="Int8Linear"/> forward against libtorch's fp32 and bf16 <c>linear</c> at LLaMA-7B shapes. A subcommand
/// rather than a flag of <c>bench</c>: it runs in this process on random layers and shares none of bench's
/// per-model options.
/// </summary>
internal static class BenchInt8Command
{
    public static Command Create()
    {
        var rounds = new Option<int>("--rounds") { Description = "Fewest timed rounds per cell (each cell also runs for at least a second)", DefaultValueFactory = _ => 7 };
        var threads = new Option<int?>("--threads") { Description = "Threads of libtorch and of the int8 kernel (default: all cores)" };
        var shapes = new Option<string>("--shapes") { Description = "Comma-separated layer shapes OUTxIN", DefaultValueFactory = _ => Format(Int8Benchmarks.Llama7BShapes) };
        var tokens = new Option<string>("--tokens") { Description = "Comma-separated tokens per call", DefaultValueFactory = _ => string.Join(',', Int8Benchmarks.TokenCounts) };
        var output = new Option<string?>("--out") { Description = "Also write the table as Markdown, with the command, CPU and date, to this file" };
        var command = new Command("int8-kernels", "Time the int8 linear forward against libtorch's fp32 and bf16 linear (the table in docs/int8.md)")
        {
            rounds, threads, shapes, tokens, output,
        };
        command.SetAction(pr => CliRunner.Run(() =>
        {
            if (pr.GetValue(threads) is < 1)
            {
                throw new ArgumentException("--threads must be at least 1");
            }
            if (pr.GetValue(rounds) < 1)
            {
                throw new ArgumentException("--rounds must be at least 1");
            }
            var options = new Int8BenchmarkOptions
            {
                Rounds = pr.GetValue(rounds),
                Shapes = ParseShapes(pr.GetValue(shapes)!),
                TokenCounts = ParseCounts(pr.GetValue(tokens)!),
            };
            TorchRuntime.Initialize(pr.GetValue(threads));
            var report = Int8Benchmarks.Run(Console.Out, options);
            if (pr.GetValue(output) is { } file)
            {
                var text = new StringBuilder();
                text.AppendLine("# int8 linear forward vs libtorch fp32 / bf16 linear");
                text.AppendLine();
                text.AppendLine(CultureInfo.InvariantCulture, $"- command: `./frugal {string.Join(' ', pr.Tokens.Select(t => t.Value))}`");
                text.AppendLine(CultureInfo.InvariantCulture, $"- machine: {BenchCommand.Machine()}");
                text.AppendLine(CultureInfo.InvariantCulture, $"- FrugalLM on .NET {Environment.Version}, TorchSharp {typeof(TorchSharp.torch).Assembly.GetName().Version}");
                text.AppendLine(CultureInfo.InvariantCulture, $"- date: {DateTime.UtcNow:yyyy-MM-dd HH:mm} UTC");
                text.AppendLine();
                text.Append(report.ToMarkdown());
                var folder = Path.GetDirectoryName(Path.GetFullPath(file))!;
                Directory.CreateDirectory(folder);
                AtomicFile.Write(file, s => s.Write(Encoding.UTF8.GetBytes(text.ToString())));
                CliRunner.Status($"wrote {file}");
            }
            return ExitCodes.Ok;
        }));
        return command;
    }

    private static string Format(IEnumerable<(int Out, int In)> shapes) =>
        string.Join(',', shapes.Select(s => string.Create(CultureInfo.InvariantCulture, $"{s.Out}x{s.In}")));

    private static List<(int Out, int In)> ParseShapes(string text) =>
        Split(text, "--shapes").Select(item =>
        {
            var parts = item.Split('x', 'X');
            return parts.Length == 2 && TryPositive(parts[0], out int o) && TryPositive(parts[1], out int i)
                ? (o, i)
                : throw new ArgumentException($"--shapes: '{item}' is not OUTxIN with positive sizes (e.g. 4096x11008)");
        }).ToList();

    private static List<int> ParseCounts(string text) =>
        Split(text, "--tokens").Select(item => TryPositive(item, out int n)
            ? n
            : throw new ArgumentException($"--tokens: '{item}' is not a positive number")).ToList();

    private static string[] Split(string text, string option)
    {
        var items = text.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries);
        return items.Length > 0 ? items : throw new ArgumentException($"{option} is empty");
    }

    private static bool TryPositive(string text, out int value) =>
        int.TryParse(text, NumberStyles.None, CultureInfo.InvariantCulture, out value) && value > 0;
}
