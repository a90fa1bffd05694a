using System.CommandLine;
using FrugalLM.Cli.Commands;

namespace FrugalLM.Cli;

/// <summary>The list of <c>frugal</c> subcommands; each comes from its own file under Commands/.</summary>
internal static class CommandCatalog
{
    public static IEnumerable<Command> All()
    {
        yield return EstimateCommand.Create();
        yield return PlanCommand.Create();
    }
}
