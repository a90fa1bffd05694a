using FrugalLM.Distributed;
using TorchSharp;

namespace FrugalLM.Tests.Distributed;

public sealed class SingleProcessCollectivesTests
{
    public SingleProcessCollectivesTests() => TestSupport.Init();

    public static TheoryData<torch.ScalarType> Types => new() { torch.ScalarType.Float32, torch.ScalarType.BFloat16 };

    [Theory]
    [MemberData(nameof(Types))]
    public void EveryCollectiveIsTheIdentity(torch.ScalarType dtype)
    {
        using var c = new SingleProcessCollectives();
        Assert.Equal((0, 1), (c.Rank, c.WorldSize));
        using var input = torch.randn(3, 7).to(dtype);
        using var gathered = torch.full(21, float.NaN, dtype);
        c.AllGather(input, gathered);
        Assert.True(gathered.view(3, 7).Same(input));

        using var asyncOut = torch.full(21, float.NaN, dtype);
        using (var request = c.AllGatherAsync(input, asyncOut))
        {
            request.Wait();
            Assert.True(request.IsCompleted);
        }
        Assert.True(asyncOut.view(3, 7).Same(input));

        foreach (var op in new[] { ReduceOp.Sum, ReduceOp.Avg })
        {
            using var shard = torch.full(21, float.NaN, dtype);
            c.ReduceScatter(input, shard, op);
            Assert.True(shard.view(3, 7).Same(input));
            using var copy = input.clone();
            c.AllReduce(copy, op);
            Assert.True(copy.Same(input));
        }
        using var broadcast = input.clone();
        c.Broadcast(broadcast, 0);
        Assert.True(broadcast.Same(input));
        c.Barrier();
    }

    [Fact]
    public void InPlaceGatherAndReduceScatterLeaveTheDataAlone()
    {
        using var c = new SingleProcessCollectives();
        using var whole = torch.arange(11, dtype: torch.ScalarType.Float32);
        using var expected = whole.clone();
        using var slot = whole.narrow(0, 0, 11);
        c.AllGather(slot, whole);
        c.ReduceScatter(whole, slot, ReduceOp.Avg);
        Assert.True(whole.Same(expected));
    }

    [Fact]
    public void BadInputsGiveClearErrors()
    {
        using var c = new SingleProcessCollectives();
        using var f = torch.zeros(8);
        using var b = torch.zeros(8, dtype: torch.ScalarType.BFloat16);
        using var ints = torch.zeros(8, dtype: torch.ScalarType.Int64);
        using var grid = torch.zeros(4, 2);
        using var transposed = grid.t();
        using var nine = torch.zeros(9);
        using var half = torch.zeros(4);

        Assert.Contains("input is Float32 but output is BFloat16", Assert.Throws<ArgumentException>(() => c.AllGather(f, b)).Message);
        Assert.Contains("must hold world size (1) x input (8) = 8", Assert.Throws<ArgumentException>(() => c.AllGather(f, nine)).Message);
        Assert.Contains("must hold input (8) / world size (1) = 8", Assert.Throws<ArgumentException>(() => c.ReduceScatter(f, half, ReduceOp.Sum)).Message);
        Assert.Contains("not contiguous", Assert.Throws<ArgumentException>(() => c.AllReduce(transposed, ReduceOp.Sum)).Message);
        Assert.Contains("take Float32, BFloat16 or Float16", Assert.Throws<ArgumentException>(() => c.Broadcast(ints, 0)).Message);
        Assert.Contains("root must be a rank from 0 to 0", Assert.Throws<ArgumentOutOfRangeException>(() => c.Broadcast(f, 1)).Message);
        using var whole = torch.zeros(16);
        using var shifted = whole.narrow(0, 3, 8);
        Assert.Contains("not this rank's (0) slot", Assert.Throws<ArgumentException>(() => c.ReduceScatter(shifted, whole.narrow(0, 0, 8), ReduceOp.Sum)).Message);
    }

    [Fact]
    public void CreateIsSingleProcessOutsideMpirun()
    {
        Assert.False(Collectives.LaunchedByMpirun); // the test runner is not started by mpirun
        using var c = Collectives.Create();
        Assert.IsType<SingleProcessCollectives>(c);
    }
}
